"""DataCompDR's distillation loss (ml-mobileclip `DRClipLoss`, `--distill-average-after-softmax`), from the
teacher embeddings stored in the shards.

Per caption slot (real, synthetic) and direction (image->text, text->image): the student's similarity
distribution over the batch (its own logit scale) is pulled towards the teachers' (logit scale 100): each
teacher's softmax over its block of the stored embedding (an ensemble of two ViT-L-14: 768 + 768 dims, each
block L2-normalised as the teachers emit it), averaged over teachers. The per-direction term is open_clip's
`DistillClipLoss.dist_loss`, the soft-target cross-entropy -sum p_teacher log p_student (= KL(teacher || student)
plus the teachers' entropy, a constant for the student: the same gradient), the two directions averaged and the
slots summed, as DRClipLoss does. Across ranks it follows open_clip's local loss: this rank's rows against every
rank's candidates (gathered with gradients).

Rows without teacher embeddings (or, on the real slot, without a real caption) are masked: neither an anchor nor
a candidate on either side. A batch (on every rank) with no such row gives an exact zero that still touches the
features, so the step and DDP's collectives proceed; the task reports the rows used per step (`distill_rows`).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from open_clip.loss import DistillClipLoss, gather_features

from clipdense.config import DataError
from clipdense.pretrain.captions import has_text, sample_rng
from clipdense.pretrain.config import DistillConfig
from clipdense.pretrain.crops import CROP_STREAM, reference_crop
from clipdense.pretrain.dr_views import parse_views, reapply_view


def _gather_masks(mask: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size == 1:
        return mask
    flags = mask.to(torch.uint8)  # not every backend gathers bool tensors
    parts = [torch.empty_like(flags) for _ in range(world_size)]
    dist.all_gather(parts, flags)
    return torch.cat(parts).bool()


class DistillLoss:
    """Callable on one caption slot: (student image/text features, student logit scale, teacher image/text
    embeddings (B, sum(teacher_dims)), row mask (B,)) -> the slot's distillation loss."""

    def __init__(self, teacher_dims: list[int], teacher_logit_scale: float = 100.0, rank: int = 0,
                 world_size: int = 1):
        self.oc = DistillClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True, rank=rank,
                                  world_size=world_size)
        self.dims, self.scale, self.world_size = list(teacher_dims), float(teacher_logit_scale), world_size
        bounds = [0]
        for d in self.dims:
            bounds.append(bounds[-1] + d)
        self.spans = list(zip(bounds[:-1], bounds[1:]))

    @property
    def teacher_dim(self) -> int:
        return sum(self.dims)

    def teacher_probs(self, anchors: torch.Tensor, candidates: torch.Tensor, rows, cols) -> torch.Tensor:
        """The teachers' softmax over the kept candidates, averaged over teachers (after softmax); in float32 even
        under autocast (at logit scale 100 a bf16 logit is off by up to 0.5)."""
        with torch.autocast(device_type=anchors.device.type, enabled=False):
            probs = [(self.scale * anchors[rows, a:b].float() @ candidates[cols, a:b].float().T).softmax(dim=1)
                     for a, b in self.spans]
        return sum(probs) / len(probs)

    def __call__(self, image_f, text_f, logit_scale, teacher_image, teacher_text, mask) -> torch.Tensor:
        if teacher_image.shape[-1] != self.teacher_dim:
            raise ValueError(f"teacher embeddings have {teacher_image.shape[-1]} dims, loss.distill.teacher_dims "
                             f"{self.dims} sum to {self.teacher_dim}")
        teacher_image = teacher_image.to(image_f.device, torch.float32)
        teacher_text = teacher_text.to(image_f.device, torch.float32)
        mask = mask.to(image_f.device)
        # the student's logits of this rank's rows against every rank's candidates (open_clip's local loss)
        s_i2t, s_t2i = self.oc.get_logits(image_f, text_f, logit_scale)
        if self.world_size > 1:
            all_t_img, all_t_txt = gather_features(teacher_image, teacher_text, local_loss=True,
                                                   gather_with_grad=False, rank=self.oc.rank,
                                                   world_size=self.world_size)
        else:
            all_t_img, all_t_txt = teacher_image, teacher_text
        all_mask = _gather_masks(mask, self.world_size)
        if not bool(mask.any()):  # zero, through the gathered features: every rank runs the same backward collectives
            return (s_i2t.sum() + s_t2i.sum()) * 0.0
        losses = []
        for student, anchors, candidates in ((s_i2t, teacher_image, all_t_txt), (s_t2i, teacher_text, all_t_img)):
            target = self.teacher_probs(anchors, candidates, mask, all_mask)
            # dist_loss takes teacher logits: log p is a logit vector whose softmax is p again
            losses.append(self.oc.dist_loss(target.log(), student[mask][:, all_mask].float()))
        return (losses[0] + losses[1]) / 2


# --- the batch side (the train worker's collate, pretrain/batches.py) ---

VIEW_STREAM = 3  # sample_rng stream of the stored-view choice (1: captions, 2: the random crop)


def distill_slots(policy: str, distill: DistillConfig) -> tuple[tuple[int, str], ...]:
    """((caption slot index, "real" | "synthetic"), ...) that get a distillation term (none when it is off)."""
    if not distill.enabled:
        return ()
    order = ["real", "synthetic"] if policy == "both" else [policy]
    return tuple((order.index(kind), kind) for kind in distill.slots)


def stored_views(batch: dict, keys: list[str], seed: int, epoch: int, size: int):
    """(image (B, 3, S, S) float in 0..255, stored view index per row (-1: none)) for a batch of full decoded
    images (`pixels`: per row H x W x 3 uint8, any size) with the original sizes in `orig_w` / `orig_h`: a row with
    `aug_params` gets one of its stored views, chosen from (seed, epoch, key); a row without (or with unreadable
    ones, which are then left out of distillation) gets the usual random crop. None when the batch has neither
    `orig_w` nor stored views (the plain random-crop path applies)."""
    augs = batch.get("aug_params")
    augs = list(augs) if augs is not None else [None] * len(keys)
    if "orig_w" not in batch or "orig_h" not in batch:
        if any(a is not None for a in augs):
            raise DataError("loss.distill: DataCompDR rows reached the collate without orig_w / orig_h (the stored "
                            "crops are in original-image pixels: the decode must ship the full image and its size)")
        return None
    image = torch.empty((len(keys), 3, size, size), dtype=torch.float32)
    index = []
    for i, key in enumerate(keys):
        px = np.asarray(batch["pixels"][i], dtype=np.uint8)
        k = -1
        if augs[i] is not None:
            try:
                views = parse_views(augs[i])
                k = int(sample_rng(seed, epoch, key, VIEW_STREAM).integers(len(views)))
                image[i] = reapply_view(px, (int(batch["orig_w"][i]), int(batch["orig_h"][i])), views[k], size)
                image[i].mul_(255.0)
            except (ValueError, TypeError, IndexError):
                k = -1
        if k < 0:
            image[i] = reference_crop(px, int(batch["orig_w"][i]), int(batch["orig_h"][i]),
                                      sample_rng(seed, epoch, key, CROP_STREAM), size)
        index.append(k)
    return image, index


def distill_targets(out: dict, keys, reals, syns, slots, distilled, view_index) -> dict:
    """The teacher embeddings each row's loss needs, from `teacher_batch`'s (B, A, D) / (B, T, D) arrays (which
    this replaces): "distill_image_emb" (B, D) of the row's stored view, "distill_text_emb" (B, n, D) of the
    caption each distilled slot picked (text_emb row 0: the real caption, 1 + j: synthetic caption j, as
    DataCompDR stores them), "distill_mask" (B, n): the row has teacher embeddings, a re-applied view and that
    caption. `distilled`: ((caption slot index, "real" | "synthetic"), ...), as `distill_slots` gives them."""
    t_img, t_txt, tmask = out.pop("teacher_image_emb"), out.pop("teacher_text_emb"), out["teacher_mask"]
    b, n_views, n_texts = t_img.shape[0], t_img.shape[1], t_txt.shape[1]
    idx = torch.tensor(view_index if view_index is not None else [-1] * b, dtype=torch.long)
    rows = torch.arange(b)
    has_view = tmask & (idx >= 0) & (idx < n_views)
    texts, masks = [], []
    for slot, kind in distilled:
        picked = slots[slot]
        if kind == "real":
            j = [0 if has_text(r) else -1 for r in reals]
        else:  # the first stored copy of the picked caption (equal captions have equal embeddings)
            j = [1 + s.index(t) if t in s else -1 for t, s in zip(picked, syns)]
        j = torch.tensor(j, dtype=torch.long)
        texts.append(t_txt[rows, j.clamp(0, n_texts - 1)])
        masks.append(has_view & (j >= 0) & (j < n_texts))
    return {"distill_image_emb": t_img[rows, idx.clamp(0, n_views - 1)], "distill_text_emb": torch.stack(texts, 1),
            "distill_mask": torch.stack(masks, 1), "distill_views": idx}
