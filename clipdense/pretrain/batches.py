"""Batch collation in the train worker (Ray Data `iter_torch_batches(collate_fn=...)`, on its prefetch threads).

Train: open_clip's default train geometry, RandomResizedCrop(scale=(0.9, 1.0), ratio=(3/4, 4/3)), applied to the
decoded square image with per-sample parameters drawn from `sample_rng(seed, epoch, key)` (so it varies by epoch
yet replays exactly on resume), as a bilinear resize of each crop (open_clip resizes bicubic), then the model's
mean/std folded with the 1/255 into one in-place pass; the caption policy picks each sample's text(s), which are
tokenised here. Eval: no crop. (Per-crop `F.interpolate` on uint8 views + one fused normalisation is ~3x cheaper
than a batched `roi_align` over a float copy: bench/data_decode.py; this runs on the train worker's CPUs.)
"""
from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from clipdense.pretrain.captions import pick_batch, real_mask, sample_rng
from clipdense.pretrain.distill import stored_views

try:  # Ray Data's typed collate (a bare callable is deprecated since Ray 2.47)
    from ray.data.collate_fn import NumpyBatchCollateFn as _CollateBase
except ImportError:  # Collate also runs without Ray (bench.gpu on a GPU box, plain loops)
    _CollateBase = object

CROP_SCALE = (0.9, 1.0)     # open_clip image_transform(is_train=True) default
CROP_RATIO = (3 / 4, 4 / 3)


def crop_box(rng: np.random.Generator, h: int, w: int, scale=CROP_SCALE, ratio=CROP_RATIO) -> tuple[float, ...]:
    """torchvision RandomResizedCrop.get_params with an explicit generator: (x1, y1, x2, y2) in pixels."""
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            return (x, y, x + cw, y + ch)
    in_ratio = w / h  # fallback: centre crop clamped to the ratio range
    cw, ch = (w, int(round(w / ratio[0]))) if in_ratio < ratio[0] else \
        (int(round(h * ratio[1])), h) if in_ratio > ratio[1] else (w, h)
    x, y = (w - cw) // 2, (h - ch) // 2
    return (x, y, x + cw, y + ch)


def random_resized_crop(images: torch.Tensor, boxes: list[tuple], size: int) -> torch.Tensor:
    """Crop each image of (B, C, H, W) (uint8 or float) to its integer pixel box and resize it to size x size:
    float32 out, bilinear with half-pixel centres (the sample points of roi_align(aligned=True), clamped at the box)."""
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.float32)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        crop = images[i:i + 1, :, int(y1):int(y2), int(x1):int(x2)].float()
        out[i] = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)[0]
    return out


@functools.lru_cache(maxsize=4)
def _tokenizer(name: str):
    from clipdense.models import tokenizer_for

    return tokenizer_for(name)


class Collate(_CollateBase):
    """numpy batch (key, caption, syn_captions, pixels[, aug_params, teacher_emb]) -> {"image": (B,3,S,S), "texts":
    [(B,L) per caption slot], "keys"}; `both` adds "real_mask" (B,) (rows with a real caption); DataCompDR rows add
    "teacher_image_emb" (B,A,D), "teacher_text_emb" (B,T,D), "teacher_mask" (B,) and "aug_params" (JSON strings).
    With `distill_slots` (loss.distill) a batch carrying `orig_w`/`orig_h` (and `pixels` per row at any size) gets
    each row's stored view as its image, and "distill_image_emb" (B,D), "distill_text_emb" (B,n,D), "distill_mask"
    (B,n), "distill_views" (B,) in place of the two teacher arrays (pretrain/distill.py)."""

    def __init__(self, *, model_name: str, image_size: int, mean, std, policy: str, seed: int, epoch: int,
                 mix_p: float = 0.5, train: bool = True, distill_slots: tuple = ()):
        self.model_name, self.size, self.policy = model_name, image_size, policy
        self.distill_slots = tuple(distill_slots)  # ((caption slot, "real" | "synthetic"), ...): loss.distill on
        mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.scale, self.shift = 1.0 / (255.0 * std), -mean / std  # (x / 255 - mean) / std = x * scale + shift
        self.seed, self.epoch, self.mix_p, self.train = seed, epoch, mix_p, train

    def __call__(self, batch: dict) -> dict:
        keys = [str(k) for k in batch["key"]]
        # loss.distill on DataCompDR: each sample's stored view (pretrain/distill.py), as its teachers embedded it
        views = stored_views(batch, keys, self.seed, self.epoch, self.size) \
            if self.train and self.distill_slots else None
        if views is None:
            with warnings.catch_warnings():  # Ray hands read-only arrays; `px` is only read (every op below copies)
                warnings.simplefilter("ignore", UserWarning)
                px = torch.from_numpy(np.asarray(batch["pixels"], dtype=np.uint8)).permute(0, 3, 1, 2)
        if views is not None:
            image, view_index = views
        elif self.train:
            h, w = px.shape[-2:]
            boxes = [crop_box(sample_rng(self.seed, self.epoch, k, 2), h, w) for k in keys]
            image = random_resized_crop(px, boxes, self.size)
        elif px.shape[-1] != self.size:
            image = F.interpolate(px.float(), size=(self.size, self.size), mode="bilinear", antialias=True)
        else:
            image = px.float()
        image = image.mul_(self.scale).add_(self.shift)
        reals = [None if c is None else str(c) for c in batch["caption"]]
        syns = [list(s) if s is not None else [] for s in batch["syn_captions"]]
        if self.train:
            slots = pick_batch(self.policy, keys, reals, syns, self.seed, self.epoch, self.mix_p)
        else:  # eval: the real caption, or the first synthetic one (also when the real one is missing)
            use_syn = self.policy == "synthetic"
            slots = [[(s[0] if s else r) if (use_syn or not r) else r for r, s in zip(reals, syns)]]
        tok = _tokenizer(self.model_name)
        out = {"image": image, "texts": [tok(texts) for texts in slots], "keys": keys}
        if self.train and self.policy == "both":
            out["real_mask"] = torch.tensor(real_mask(reals), dtype=torch.bool)
        embs = batch.get("teacher_emb")
        if embs is not None and any(e is not None for e in embs):  # DataCompDR rows: for distillation losses
            from clipdense.data.datacompdr import teacher_batch

            out.update(teacher_batch(embs, keys))
            out["aug_params"] = [None if a is None else str(a) for a in batch["aug_params"]]
        if self.train and self.distill_slots and "teacher_mask" in out:
            from clipdense.pretrain.distill import distill_targets

            out.update(distill_targets(out, keys, reals, syns, slots, self.distill_slots,
                                       view_index if views is not None else None))
        return out
