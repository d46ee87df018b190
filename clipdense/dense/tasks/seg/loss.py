"""Segmentation's training loss: cross-entropy (label 255 ignored) + the weighted auxiliary head's."""
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
