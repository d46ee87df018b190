"""Batch collation in the train worker (Ray Data `iter_torch_batches(collate_fn=...)`, on its prefetch threads).

Train: open_clip's default train geometry, RandomResizedCrop(scale=(0.9, 1.0), ratio=(3/4, 4/3)), applied to the
decoded square image with per-sample parameters drawn from `sample_rng(seed, epoch, key)` (so it varies by epoch
yet replays exactly on resume), as one batched `roi_align` (bilinear; open_clip resizes bicubic), then the model's
mean/std; the caption policy picks each sample's text(s), which are tokenised here. Eval: no crop.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from clipdense.pretrain.captions import pick_batch, sample_rng

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
    """Crop each image of (B, C, H, W) float to its box and resize to size x size, in one batched op."""
    from torchvision.ops import roi_align

    idx = torch.arange(images.shape[0], dtype=images.dtype).unsqueeze(1)
    rois = torch.cat([idx, torch.tensor(boxes, dtype=images.dtype)], dim=1)
    return roi_align(images, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=1, aligned=True)


@functools.lru_cache(maxsize=4)
def _tokenizer(name: str):
    from clipdense.models import tokenizer_for

    return tokenizer_for(name)


class Collate:
    """numpy batch (key, caption, syn_captions, pixels) -> {"image": (B,3,S,S), "texts": [(B,L) per caption slot]}."""

    def __init__(self, *, model_name: str, image_size: int, mean, std, policy: str, seed: int, epoch: int,
                 mix_p: float = 0.5, train: bool = True):
        self.model_name, self.size, self.policy = model_name, image_size, policy
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.seed, self.epoch, self.mix_p, self.train = seed, epoch, mix_p, train

    def __call__(self, batch: dict) -> dict:
        keys = [str(k) for k in batch["key"]]
        px = torch.from_numpy(np.array(batch["pixels"], dtype=np.uint8)).permute(0, 3, 1, 2).float().div_(255.0)
        if self.train:
            h, w = px.shape[-2:]
            boxes = [crop_box(sample_rng(self.seed, self.epoch, k, 2), h, w) for k in keys]
            px = random_resized_crop(px, boxes, self.size)
        elif px.shape[-1] != self.size:
            px = torch.nn.functional.interpolate(px, size=(self.size, self.size), mode="bilinear", antialias=True)
        image = (px - self.mean) / self.std
        reals = [None if c is None else str(c) for c in batch["caption"]]
        syns = [list(s) if s is not None else [] for s in batch["syn_captions"]]
        if self.train:
            slots = pick_batch(self.policy, keys, reals, syns, self.seed, self.epoch, self.mix_p)
        else:  # eval: the real caption, or the first synthetic one (also when the real one is missing)
            use_syn = self.policy == "synthetic"
            slots = [[(s[0] if s else r) if (use_syn or not r) else r for r, s in zip(reals, syns)]]
        tok = _tokenizer(self.model_name)
        return {"image": image, "texts": [tok(texts) for texts in slots], "keys": keys}
