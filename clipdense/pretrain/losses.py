"""Pretraining objectives, one small class per loss (the shape of open_clip's task files): each takes the model and a
step's inputs and returns (loss, metrics). `build_objective` picks one from the `loss:` section.

- `ClipObjective`: open_clip's ClipLoss(local_loss=True, gather_with_grad=True) across ranks, per caption slot.
- `SiglipObjective`: open_clip's SigLipLoss.
- `CocaObjective`: open_clip's CoCaLoss (contrastive + captioning), the image repeated per caption slot.
- `DistillObjective`: DataCompDR (`loss.distill`): weights x (the contrastive terms, the distillation terms of
  pretrain/distill.py on its slots, from the teacher embeddings the collate selects for each row's stored view and
  caption).
Policy `both` (DataCompDR) adds the loss on (image, synthetic caption) to the loss on (image, real caption); rows
without a real caption are masked out of the real term (`masked_clip_loss` / `masked_siglip_loss`, equal to
open_clip's losses when no row is masked). After every optimizer step logit_scale is clamped to [0, ln 100]
(`clamp_logit_scale`), as open_clip_train does.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from open_clip.loss import ClipLoss, CoCaLoss, SigLipLoss, gather_features

from clipdense.pretrain.config import DistillConfig, LossConfig
from clipdense.pretrain.distill import DistillLoss

LOGIT_SCALE_MAX = math.log(100)  # open_clip_train clamps logit_scale to [0, ln 100] after every optimizer step
_EXCLUDED = -1e4  # a logit no softmax over scaled cosines (|x| <= 100) gives weight to, finite so no inf * 0


def clamp_logit_scale(model) -> None:
    """open_clip_train's clamp, for every model kind (CLIP, SigLIP, CoCa): without it the temperature can grow
    past 100 at high lr and destabilise training."""
    with torch.no_grad():
        model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)


def build_loss(kind: str, rank: int, world_size: int, caption_weight: float = 2.0, contrastive_weight: float = 1.0):
    """open_clip's loss module for `kind`, set up as open_clip_train sets it up for `rank` of `world_size`."""
    if kind == "coca":
        return CoCaLoss(caption_loss_weight=caption_weight, clip_loss_weight=contrastive_weight, pad_id=0,
                        local_loss=True, gather_with_grad=True, cache_labels=True, rank=rank, world_size=world_size)
    if kind == "siglip":
        return SigLipLoss(cache_labels=True, rank=rank, world_size=world_size)
    return ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True, rank=rank, world_size=world_size)


def _gathered(image_f: torch.Tensor, text_f: torch.Tensor, mask: torch.Tensor, rank: int, world_size: int):
    """All ranks' features (with gradients, as open_clip's gather_with_grad) and masks; the same collectives on every
    rank whatever its mask holds."""
    if world_size == 1:
        return image_f, text_f, mask
    all_img, all_txt = gather_features(image_f, text_f, local_loss=True, gather_with_grad=True, rank=rank,
                                       world_size=world_size)
    flags = mask.to(torch.uint8)  # not every backend gathers bool tensors
    masks = [torch.empty_like(flags) for _ in range(world_size)]
    dist.all_gather(masks, flags)
    return all_img, all_txt, torch.cat(masks).bool()


def masked_clip_loss(image_f, text_f, logit_scale, mask, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """open_clip's ClipLoss (local_loss, gather_with_grad) over the rows whose `mask` is true: a masked row's text is
    neither an anchor nor a candidate; its image stays a candidate (a true negative for the other texts).
    With every row kept it equals ClipLoss."""
    all_img, all_txt, all_mask = _gathered(image_f, text_f, mask, rank, world_size)
    n = image_f.shape[0]
    labels = torch.arange(n, device=image_f.device) + n * rank
    per_image = (logit_scale * image_f @ all_txt.T).masked_fill(~all_mask[None, :], _EXCLUDED)
    per_text = logit_scale * text_f @ all_img.T
    ce = F.cross_entropy(per_image, labels, reduction="none") + F.cross_entropy(per_text, labels, reduction="none")
    ce = torch.where(mask, ce, torch.zeros_like(ce))
    return ce.sum() / (2 * mask.sum().clamp(min=1))


def masked_siglip_loss(image_f, text_f, logit_scale, logit_bias, mask, rank: int = 0,
                       world_size: int = 1) -> torch.Tensor:
    """open_clip's SigLipLoss (every image against every rank's texts) over the kept rows' texts and images."""
    _, all_txt, all_mask = _gathered(image_f, text_f, mask, rank, world_size)
    n = image_f.shape[0]
    logits = logit_scale * image_f @ all_txt.T + logit_bias
    labels = -torch.ones_like(logits)
    labels[torch.arange(n), torch.arange(n) + n * rank] = 1.0
    keep = mask[:, None] & all_mask[None, :]
    pair = -F.logsigmoid(labels * logits)
    return torch.where(keep, pair, torch.zeros_like(pair)).sum() / mask.sum().clamp(min=1)


class ClipObjective:
    """open_clip's ClipLoss on each caption slot, the real slot's masked rows (`both`) left out."""

    def __init__(self, rank: int, world_size: int, kind: str = "clip"):
        self.rank, self.world_size = rank, world_size
        self.loss_fn = build_loss(kind, rank, world_size)

    def contrastive(self, out: dict, text_f: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None:  # every rank takes this path under `both`, so the collectives match
            return masked_clip_loss(out["image_features"], text_f, out["logit_scale"], mask, self.rank,
                                    self.world_size)
        return self.loss_fn(out["image_features"], text_f, out["logit_scale"])

    def forward(self, model, image: torch.Tensor, texts: list[torch.Tensor]) -> tuple[dict, list[torch.Tensor]]:
        """(the model's output, text features per caption slot): all slots through the text tower in one call."""
        out = model(image, torch.cat(texts) if len(texts) > 1 else texts[0])
        return out, out["text_features"].chunk(len(texts)) if len(texts) > 1 else [out["text_features"]]

    def slot_losses(self, out: dict, text_fs: list[torch.Tensor], mask, metrics: dict) -> list[torch.Tensor]:
        losses = [self.contrastive(out, t, mask if i == 0 else None) for i, t in enumerate(text_fs)]
        if len(losses) > 1:
            metrics.update({"loss_real": float(losses[0].detach()), "loss_syn": float(losses[1].detach())})
        return losses

    def __call__(self, model, image, texts, mask, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        out, text_fs = self.forward(model, image, texts)
        metrics: dict[str, float] = {}
        total = sum(self.slot_losses(out, text_fs, mask, metrics))
        metrics["logit_scale"] = float(out["logit_scale"].detach())
        return total, metrics


class SiglipObjective(ClipObjective):
    """open_clip's SigLipLoss on each caption slot (the real slot's masked rows left out)."""

    def __init__(self, rank: int, world_size: int):
        super().__init__(rank, world_size, "siglip")

    def contrastive(self, out: dict, text_f: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None:
            return masked_siglip_loss(out["image_features"], text_f, out["logit_scale"], out["logit_bias"], mask,
                                      self.rank, self.world_size)
        return self.loss_fn(out["image_features"], text_f, out["logit_scale"], out["logit_bias"])


class DistillObjective(ClipObjective):
    """DataCompDR's loss: weights[0] x the CLIP terms + weights[1] x the distillation terms of `slots`. A batch
    without teacher embeddings takes all-masked zeros, so every rank runs the same collectives."""

    def __init__(self, rank: int, world_size: int, cfg: DistillConfig, slots: tuple[tuple[int, str], ...]):
        super().__init__(rank, world_size)
        self.weights, self.slots = cfg.weights, slots
        self.distill = DistillLoss(cfg.teacher_dims, cfg.logit_scale, rank, world_size)

    def __call__(self, model, image, texts, mask, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        out, text_fs = self.forward(model, image, texts)
        metrics: dict[str, float] = {}
        w_contrastive, w_distill = self.weights
        losses = self.slot_losses(out, text_fs, mask, metrics) if w_contrastive else []
        total = w_contrastive * sum(losses) if losses else 0.0
        total = total + w_distill * self._distill_terms(out, text_fs, batch, metrics)
        metrics["logit_scale"] = float(out["logit_scale"].detach())
        return total, metrics

    def _distill_terms(self, out: dict, text_fs: list, batch: dict, metrics: dict) -> torch.Tensor:
        b = out["image_features"].shape[0]
        if "distill_mask" in batch:
            t_img, t_txt, keep = batch["distill_image_emb"], batch["distill_text_emb"], batch["distill_mask"]
        else:
            d = self.distill.teacher_dim
            t_img, t_txt = torch.zeros(b, d), torch.zeros(b, len(self.slots), d)
            keep = torch.zeros(b, len(self.slots), dtype=torch.bool)
        total = 0.0
        for j, (slot, kind) in enumerate(self.slots):
            term = self.distill(out["image_features"], text_fs[slot], out["logit_scale"], t_img, t_txt[:, j],
                                keep[:, j])
            metrics[f"distill_{kind}"] = float(term.detach())
            total = total + term
        metrics["distill_rows"] = float(keep.any(1).sum())
        return total


class CocaObjective:
    """open_clip's CoCaLoss per caption slot (the decoder needs a caption per image: the image goes once per slot);
    the real slot's masked rows (`both`) leave the contrastive term and their captioning targets become padding."""

    def __init__(self, rank: int, world_size: int, caption_weight: float, contrastive_weight: float):
        self.rank, self.world_size = rank, world_size
        self.caption_weight, self.contrastive_weight = caption_weight, contrastive_weight
        self.loss_fn = build_loss("coca", rank, world_size, caption_weight, contrastive_weight)

    def __call__(self, model, image, texts, mask, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        n, b = len(texts), image.shape[0]
        out = model(image.repeat(n, 1, 1, 1) if n > 1 else image, torch.cat(texts) if n > 1 else texts[0])
        metrics: dict[str, float] = {}
        total = 0.0
        for i in range(n):
            sl = slice(i * b, (i + 1) * b)
            if i == 0 and mask is not None:
                clip_l, cap_l = self._masked(out, sl, mask)
            else:
                clip_l, cap_l = self.loss_fn(out["image_features"][sl], out["text_features"][sl], out["logits"][sl],
                                             out["labels"][sl], out["logit_scale"])
            total = total + clip_l + cap_l
            metrics[f"caption_loss_{i}"] = float(cap_l.detach())
        metrics["logit_scale"] = float(out["logit_scale"].detach())
        return total, metrics

    def _masked(self, out: dict, sl: slice, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CoCaLoss on the real-caption slot with masked rows left out (CoCaLoss ignores pad_id 0)."""
        clip_l = masked_clip_loss(out["image_features"][sl], out["text_features"][sl], out["logit_scale"], mask,
                                  self.rank, self.world_size) * self.contrastive_weight
        labels = out["labels"][sl].masked_fill(~mask[:, None], 0)
        logits = out["logits"][sl]
        if bool(mask.any()):
            cap_l = F.cross_entropy(logits.permute(0, 2, 1), labels, ignore_index=0)
        else:
            cap_l = logits.sum() * 0.0
        return clip_l, cap_l * self.caption_weight


def build_objective(kind: str, cfg: LossConfig, distill_slots: tuple, rank: int, world_size: int):
    """The objective of `kind` (resolved: clip | siglip | coca) for this rank; `loss.distill` (CLIP models only,
    checked where the model is built) makes it DataCompDR's."""
    if cfg.distill.enabled:
        return DistillObjective(rank, world_size, cfg.distill, distill_slots)
    if kind == "coca":
        return CocaObjective(rank, world_size, cfg.coca_caption_weight, cfg.coca_contrastive_weight)
    return SiglipObjective(rank, world_size) if kind == "siglip" else ClipObjective(rank, world_size)
