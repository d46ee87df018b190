"""Training losses: segmentation cross-entropy (ignore 255, + weighted auxiliary head) and depth SigLoss."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from clipdense.dense.heads import resize

IGNORE = 255


def seg_loss(out: dict[str, torch.Tensor], target: torch.Tensor, aux_weight: float = 0.4
             ) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy of stride-4 logits upsampled to the label size; the auxiliary head adds `aux_weight` x its CE."""
    target = target.long()
    main = F.cross_entropy(resize(out["seg"], target.shape[-2:]), target, ignore_index=IGNORE)
    total, parts = main, {"loss_seg": float(main.detach())}
    if "aux" in out and aux_weight > 0:
        aux = F.cross_entropy(resize(out["aux"], target.shape[-2:]), target, ignore_index=IGNORE)
        total = total + aux_weight * aux
        parts["loss_aux"] = float(aux.detach())
    if not torch.isfinite(main):  # a batch with only ignored pixels: keep the graph, contribute nothing
        total = out["seg"].sum() * 0.0
    return total, parts


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
