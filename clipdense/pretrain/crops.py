"""Crop geometry of pretraining's train transform: open_clip's RandomResizedCrop(scale=(0.9, 1.0), ratio=(3/4, 4/3))
on the FULL image, bicubic.

Each box is drawn on the image's original geometry exactly as torchvision's `RandomResizedCrop.get_params` would
(`crop_box`, with the generator `sample_rng(seed, epoch, key, CROP_STREAM)`: it varies by epoch yet replays exactly
on resume), mapped to the decoded copy (`source_box`: the decode may be JPEG-draft reduced) and resized with torch's
uint8 antialiased bicubic (PIL's filter; within 1 level of torchvision on a PIL image, several times cheaper than
PIL's resize). The CPU collate (pretrain/batches.py), the stored-view fallback (pretrain/distill.py) and the GPU
decode (pretrain/gpu_decode.py) all draw their boxes here, so the three paths crop the same regions.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from clipdense.config import DataError
from clipdense.pretrain.captions import sample_rng

CROP_SCALE = (0.9, 1.0)     # open_clip image_transform(is_train=True) default
CROP_RATIO = (3 / 4, 4 / 3)
CROP_STREAM = 2             # sample_rng stream of the random crop (1: captions, 3: the stored-view choice)


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


def sample_box(seed: int, epoch: int, key: str, orig_w: int, orig_h: int) -> tuple[float, ...]:
    """One sample's crop box on its original geometry: a pure function of (seed, epoch, key)."""
    return crop_box(sample_rng(seed, epoch, key, CROP_STREAM), orig_h, orig_w)


def source_box(box: tuple, orig_w: int, orig_h: int, w: int, h: int) -> tuple[int, int, int, int]:
    """A box drawn on the original (orig_w x orig_h) image -> integer pixels of its decoded (w x h) copy (the same
    box when nothing was reduced; else scaled and rounded, at least one pixel, inside the image)."""
    if (w, h) == (orig_w, orig_h):
        return tuple(int(v) for v in box)
    sx, sy = w / orig_w, h / orig_h
    x1, y1 = min(w - 1, max(0, round(box[0] * sx))), min(h - 1, max(0, round(box[1] * sy)))
    return x1, y1, max(x1 + 1, min(w, round(box[2] * sx))), max(y1 + 1, min(h, round(box[3] * sy)))


def _chw(image: np.ndarray) -> torch.Tensor:
    """(h, w, 3) uint8 numpy -> a (1, 3, h, w) channels-last torch view (Ray hands read-only arrays: only read)."""
    return torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0)


def _resize(view: torch.Tensor, box: tuple, size: int) -> torch.Tensor:
    """(1, 3, h, w) uint8 view, integer pixel box -> (1, 3, size, size) uint8: torch's uint8 antialiased bicubic
    kernel (PIL's filter), called directly: per sample, F.interpolate's argument checks cost more than the kernel
    on small images."""
    x1, y1, x2, y2 = box
    crop = view[:, :, y1:y2, x1:x2].contiguous(memory_format=torch.channels_last)  # its fast path wants it dense
    return torch._C._nn._upsample_bicubic2d_aa(crop, (size, size), False, None, None)


def resized_crop(image: np.ndarray, box: tuple, size: int) -> torch.Tensor:
    """(h, w, 3) uint8 -> the integer pixel box resized to (3, size, size) uint8: bicubic with antialias, PIL's
    filter (torch's uint8 kernel for antialias=True; within 1 of torchvision's resized_crop on a PIL image)."""
    with warnings.catch_warnings():  # a read-only array is only read here (the crop is copied)
        warnings.simplefilter("ignore", UserWarning)
        return _resize(_chw(image), box, size)[0]


def reference_crop(image: np.ndarray, orig_w: int, orig_h: int, rng: np.random.Generator, size: int) -> torch.Tensor:
    """open_clip's train crop of one decoded (h, w, 3) uint8 image whose original was orig_w x orig_h: the box
    drawn on the original geometry, mapped to the decoded copy, resized -> (3, size, size) uint8."""
    h, w = image.shape[:2]
    return resized_crop(image, source_box(crop_box(rng, orig_h, orig_w), orig_w, orig_h, w, h), size)


def random_resized_crops(images, boxes: list[tuple], size: int) -> torch.Tensor:
    """Each (h, w, 3) uint8 image cropped to its integer pixel box and resized to size x size -> (B, 3, S, S) uint8."""
    out = torch.empty((len(boxes), 3, size, size), dtype=torch.uint8)
    with warnings.catch_warnings():  # once per batch: per sample it costs as much as a small crop
        warnings.simplefilter("ignore", UserWarning)
        for i, box in enumerate(boxes):
            out[i] = _resize(_chw(images[i]), box, size)[0]
    return out


def reference_boxes(ims: list[np.ndarray], origs, keys: list[str], seed: int, epoch: int) -> list[tuple]:
    """Each sample's RandomResizedCrop box, drawn on its original (w, h) and mapped to its decoded copy."""
    return [source_box(sample_box(seed, epoch, k, int(ow), int(oh)), int(ow), int(oh), im.shape[1], im.shape[0])
            for im, k, (ow, oh) in zip(ims, keys, origs)]


def undecodable_row(key: str, error, decode_on: str) -> DataError:
    """The one-line DataError for a row whose header passed Ray Data's check but whose pixels do not decode in the
    train worker (data.decode_on worker | gpu): dropping it there would leave this worker's batch smaller than the
    others' (the contrastive loss gathers equal batches)."""
    return DataError(f"{key}: {error.code}: {error.detail} (data.decode_on {decode_on} decodes in the train worker; "
                     f"data.validate_images=full records such rows as errors before training)")
