"""What every task's dataset (dense/tasks/<task>/dataset.py) shares: nested data fractions, per-sample RNG,
image/label reading with one-line errors, and the numpy augmentations (random resize, crop with cat_max_ratio, flip,
photometric distortion, pad)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from clipdense.config import DataError
from clipdense.data.images import ImageError, load_pixels, load_rgb, open_path

IGNORE = 255


def subset_indices(n: int, fraction: float, seed: int) -> list[int]:
    """A deterministic subset of range(n): the first ceil(fraction * n) of one seeded permutation, so smaller
    fractions are nested inside larger ones (same seed). Returned sorted."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    return sorted(int(i) for i in perm[: math.ceil(fraction * n)])


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """Augmentation randomness as a pure function of (seed, epoch, sample index): exact resume, any worker count."""
    return np.random.default_rng([seed, epoch, index])


def _unreadable(path: Path, what: str, e: ImageError) -> DataError:
    problem = f"{what} too large" if e.code == "image_too_large" else f"unreadable {what}"
    return DataError(f"{path}: {problem} ({e.detail})")


def read_rgb(path: Path) -> np.ndarray:
    try:
        with open_path(path) as im:
            return np.asarray(load_rgb(im))
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except ImageError as e:
        raise _unreadable(path, "image", e) from None


def read_png(path: Path, what: str) -> np.ndarray:
    """A single-channel PNG (8-bit labels, 16-bit depth) as a 2-D array."""
    try:
        with open_path(path) as im:
            arr = np.asarray(load_pixels(im))
    except FileNotFoundError:
        raise DataError(f"{path}: {what} file not found") from None
    except ImageError as e:
        raise _unreadable(path, what, e) from None
    if arr.ndim != 2:
        raise DataError(f"{path}: {what} must be a single-channel PNG, got shape {arr.shape}")
    return arr


def check_same_size(image: np.ndarray, dense: np.ndarray, dense_path: Path, image_path: Path, what: str) -> None:
    if image.shape[:2] != dense.shape[:2]:
        raise DataError(f"{dense_path}: {what} size {dense.shape[1]}x{dense.shape[0]} does not match image "
                        f"{image_path.name} size {image.shape[1]}x{image.shape[0]}")


def _resize(arr: np.ndarray, size_hw: tuple[int, int], nearest: bool) -> np.ndarray:
    h, w = size_hw
    resample = Image.NEAREST if nearest else Image.BILINEAR
    return np.asarray(Image.fromarray(arr).resize((w, h), resample))  # float32 arrays become mode "F"


def keep_ratio_size(h: int, w: int, scale: tuple[float, float]) -> tuple[int, int]:
    """mmseg keep-ratio rescale to `scale` = (long, short): the largest size fitting both bounds."""
    long_s, short_s = max(scale), min(scale)
    f = min(long_s / max(h, w), short_s / min(h, w))
    return max(1, int(h * f + 0.5)), max(1, int(w * f + 0.5))


def resize_image(img: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    return img if img.shape[:2] == tuple(size_hw) else _resize(img, size_hw, nearest=False)


def resize_mask(mask: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label or instance mask."""
    return _resize(mask, size_hw, nearest=True)


def random_resize(img, label, scale, ratio_range, rng):
    r = rng.uniform(*ratio_range)
    size = keep_ratio_size(*img.shape[:2], (scale[0] * r, scale[1] * r))
    return _resize(img, size, nearest=False), _resize(label, size, nearest=True)


def random_crop(img, dense, crop_hw, rng, cat_max_ratio: float = 1.0, ignore: int = IGNORE):
    """mmseg RandomCrop: a uniform box of at most crop size; with cat_max_ratio < 1, re-draw up to 10 times while one
    class covers more than that share of the crop's labelled pixels."""
    ch, cw = crop_hw
    h, w = dense.shape[:2]

    def draw():
        return int(rng.integers(0, max(h - ch, 0) + 1)), int(rng.integers(0, max(w - cw, 0) + 1))

    y, x = draw()
    if cat_max_ratio < 1.0:
        for _ in range(10):
            labels, counts = np.unique(dense[y:y + ch, x:x + cw], return_counts=True)
            counts = counts[labels != ignore]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            y, x = draw()
    return img[y:y + ch, x:x + cw], dense[y:y + ch, x:x + cw]


def random_flip(img, dense, rng, p: float = 0.5):
    if rng.random() < p:
        return img[:, ::-1], dense[:, ::-1]
    return img, dense


def photometric(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Approximately mmseg's PhotoMetricDistortion: brightness +-32, contrast x[0.5,1.5] (before or after colour),
    saturation x[0.5,1.5], hue +-18 degrees, each with probability 0.5."""
    out = img.astype(np.float32)
    if rng.random() < 0.5:
        out = out + rng.uniform(-32, 32)
    contrast_first = rng.random() < 0.5
    alpha = rng.uniform(0.5, 1.5) if rng.random() < 0.5 else None
    if contrast_first and alpha is not None:
        out = out * alpha
    pil = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
    if rng.random() < 0.5:
        pil = ImageEnhance.Color(pil).enhance(rng.uniform(0.5, 1.5))
    if rng.random() < 0.5:
        hsv = np.asarray(pil.convert("HSV")).copy()
        hsv[..., 0] = (hsv[..., 0].astype(np.int32) + int(rng.uniform(-18, 18) * 256 / 360)) % 256
        pil = Image.merge("HSV", [Image.fromarray(hsv[..., c]) for c in range(3)]).convert("RGB")
    out = np.asarray(pil).astype(np.float32)
    if not contrast_first and alpha is not None:
        out = out * alpha
    return np.clip(out, 0, 255).astype(np.uint8)


def pad_to(img: np.ndarray, dense: np.ndarray, size_hw, dense_fill) -> tuple[np.ndarray, np.ndarray]:
    """Pad bottom/right to `size_hw`: image with 0, the dense target with `dense_fill` (255 labels, 0 depth)."""
    h, w = dense.shape[:2]
    ph, pw = max(size_hw[0] - h, 0), max(size_hw[1] - w, 0)
    if ph or pw:
        img = np.pad(img, ((0, ph), (0, pw), (0, 0)), constant_values=0)
        dense = np.pad(dense, ((0, ph), (0, pw)), constant_values=dense_fill)
    return img, dense


def to_chw(img: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
