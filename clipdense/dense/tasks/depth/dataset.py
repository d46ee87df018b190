"""NYUv2 depth in the BTS layout: list files with lines `rgb_path depth_path focal` (paths relative to the dataset
root, or to root/train_dir | root/test_dir, with a leading '/'); depth is a 16-bit PNG in millimetres (0 = no data)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from clipdense.config import DataError
from clipdense.dense.dataset_common import (
    check_same_size,
    pad_to,
    photometric,
    random_crop,
    random_flip,
    read_png,
    read_rgb,
    sample_rng,
    subset_indices,
    to_chw,
)


def read_list(root: str | Path, list_file: str, subdir: str = "") -> list[tuple[Path, Path, float | None]]:
    """Parse a BTS file list; a malformed line is an error naming the file and line number."""
    root = Path(root)
    path = root / list_file
    if not path.is_file():
        raise DataError(f"{path}: NYU file list not found")
    base = root / subdir if subdir else root
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2 or parts[1] == "None":
            raise DataError(f"{path}:{n}: expected 'rgb_path depth_path [focal]', got {line.strip()[:80]!r}")
        try:
            focal = float(parts[2]) if len(parts) > 2 else None
        except ValueError:
            raise DataError(f"{path}:{n}: focal {parts[2]!r} is not a number") from None
        rows.append((base / parts[0].lstrip("/"), base / parts[1].lstrip("/"), focal))
    if not rows:
        raise DataError(f"{path}: empty NYU file list")
    return rows


def load_depth(path: Path, image: np.ndarray, image_path: Path) -> np.ndarray:
    """uint16 millimetres -> float32 metres, checked against the image size."""
    raw = read_png(path, "depth")
    if raw.dtype.kind not in "ui":
        raise DataError(f"{path}: depth PNG must be 16-bit integer millimetres, got {raw.dtype}")
    check_same_size(image, raw, path, image_path, "depth")
    return raw.astype(np.float32) / 1000.0


NYU_CROP = (45, 472, 43, 608)  # rows, cols kept of a 480x640 NYU frame (the Toolbox's NYUCrop)


def nyu_crop(img: np.ndarray, depth: np.ndarray, path: Path) -> tuple[np.ndarray, np.ndarray]:
    if img.shape[:2] != (480, 640):
        raise DataError(f"{path}: data.nyu_crop needs 480x640 NYU frames, got {img.shape[1]}x{img.shape[0]}")
    y0, y1, x0, x1 = NYU_CROP
    return img[y0:y1, x0:x1], depth[y0:y1, x0:x1]


def random_rotate(img: np.ndarray, depth: np.ndarray, degrees: float, rng, p: float = 0.5):
    """With probability p, rotate both by U(-degrees, degrees): image bilinear, depth nearest (no blended depths),
    uncovered corners 0 (black image, invalid depth)."""
    if degrees <= 0 or rng.random() >= p:
        return img, depth
    angle = float(rng.uniform(-degrees, degrees))
    img = np.asarray(Image.fromarray(np.ascontiguousarray(img)).rotate(angle, resample=Image.BILINEAR))
    depth = np.asarray(Image.fromarray(np.ascontiguousarray(depth)).rotate(angle, resample=Image.NEAREST))
    return img, depth


def color_aug(img: np.ndarray, rng, p: float = 0.5) -> np.ndarray:
    """BTS / the Toolbox's ColorAug on [0, 1] intensities: gamma U(0.9, 1.1), brightness U(0.75, 1.25), a colour
    factor U(0.9, 1.1) per channel, clipped."""
    if rng.random() >= p:
        return img
    x = (img.astype(np.float32) / 255.0) ** rng.uniform(0.9, 1.1)
    x = x * rng.uniform(0.75, 1.25) * rng.uniform(0.9, 1.1, size=3).astype(np.float32)
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


class NYUTrain(Dataset):
    """[NYUCrop, random rotation,] random flip + random crop (pad with invalid depth 0 if smaller) + optional
    photometric distortion or ColorAug. Items: {"img": uint8 CHW, "depth": float32 HW metres (0 = invalid)}."""

    def __init__(self, root, list_file: str, subdir: str = "", crop=(416, 544), photometric_aug: bool = True,
                 fraction: float = 1.0, subset_seed: int = 0, aug_seed: int = 0, nyu_crop: bool = False,
                 rotate_degrees: float = 0.0, color_aug: bool = False):
        rows = read_list(root, list_file, subdir)
        self.indices = subset_indices(len(rows), fraction, subset_seed)
        self.rows = [rows[i] for i in self.indices]
        self.crop, self.photometric, self.aug_seed = tuple(crop), photometric_aug, aug_seed
        self.nyu_crop, self.rotate_degrees, self.color_aug = nyu_crop, rotate_degrees, color_aug

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        rgb_path, depth_path, _ = self.rows[index]
        img = read_rgb(rgb_path)
        depth = load_depth(depth_path, img, rgb_path)
        rng = sample_rng(self.aug_seed, epoch, index)
        if self.nyu_crop:
            img, depth = nyu_crop(img, depth, rgb_path)
        img, depth = random_rotate(img, depth, self.rotate_degrees, rng)
        img, depth = random_flip(img, depth, rng)
        img, depth = random_crop(img, depth, self.crop, rng)
        if self.color_aug:
            img = color_aug(img, rng)
        elif self.photometric:
            img = photometric(np.ascontiguousarray(img), rng)
        img, depth = pad_to(img, depth, self.crop, 0.0)
        return {"img": to_chw(img), "depth": torch.from_numpy(np.ascontiguousarray(depth))}


class NYUEval(Dataset):
    """Full test images. Items: {"img", "depth", "name": the depth path relative to the root}."""

    def __init__(self, root, list_file: str, subdir: str = "", max_images: int | None = None):
        self.root = Path(root)
        self.rows = read_list(root, list_file, subdir)[:max_images]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        rgb_path, depth_path, _ = self.rows[index]
        img = read_rgb(rgb_path)
        depth = load_depth(depth_path, img, rgb_path)
        return {"img": to_chw(img), "depth": torch.from_numpy(depth),
                "name": depth_path.relative_to(self.root).as_posix()}
