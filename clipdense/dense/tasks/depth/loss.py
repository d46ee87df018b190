"""Depth's training loss: SigLoss, the scale-invariant log loss."""
from __future__ import annotations

import torch


def sig_loss(pred: torch.Tensor, gt: torch.Tensor, min_depth: float = 1e-3, max_depth: float | None = None,
             weight: float = 10.0, eps: float = 1e-3) -> torch.Tensor:
    """Scale-invariant log loss (Eigen et al.; Monocular-Depth-Estimation-Toolbox SigLoss, lambda = 0.85):
    weight * sqrt(mean(g^2) - 0.85 mean(g)^2), g = log(pred) - log(gt), over the batch's valid pixels."""
    valid = gt > min_depth
    if max_depth is not None:
        valid &= gt <= max_depth
    if not valid.any():
        return pred.sum() * 0.0
    g = torch.log(pred[valid] + eps) - torch.log(gt[valid] + eps)
    d = (g ** 2).mean() - 0.85 * g.mean() ** 2
    return weight * torch.sqrt(d.clamp_min(1e-12))
