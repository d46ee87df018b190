"""ADE20k reader: `ADEChallengeData2016/images/{training,validation}/*.jpg` + `annotations/<split>/<stem>.png`
(uint8 labels, 0 = "other"). With reduce_zero_label (mmseg): 0 -> 255 (ignored), k -> k-1, 255 stays 255."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from clipdense.config import DataError
from clipdense.dense.dataset_common import (
    IGNORE,
    check_same_size,
    keep_ratio_size,
    pad_to,
    photometric,
    random_crop,
    random_flip,
    random_resize,
    read_png,
    read_rgb,
    resize_image,
    sample_rng,
    subset_indices,
    to_chw,
)


def ade_base(root: str | Path) -> Path:
    root = Path(root)
    return root / "ADEChallengeData2016" if (root / "ADEChallengeData2016").is_dir() else root


def list_pairs(root: str | Path, split: str) -> list[tuple[Path, Path]]:
    """(image, annotation) pairs of one split, sorted by file name; a missing annotation is an error naming it."""
    base = ade_base(root)
    img_dir, ann_dir = base / "images" / split, base / "annotations" / split
    if not img_dir.is_dir():
        raise DataError(f"{img_dir}: ADE20k image directory not found (data.root should hold ADEChallengeData2016/)")
    images = sorted(img_dir.glob("*.jpg"))
    if not images:
        raise DataError(f"{img_dir}: no .jpg images")
    pairs = []
    for img in images:
        ann = ann_dir / f"{img.stem}.png"
        if not ann.is_file():
            raise DataError(f"{ann}: annotation missing for image {img.name}")
        pairs.append((img, ann))
    return pairs


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """mmseg's reduce_zero_label: 0 -> 255, k -> k-1 (255 stays ignored)."""
    out = label.astype(np.int16) - 1
    out[label == 0] = IGNORE
    out[label == IGNORE] = IGNORE
    return out.astype(np.uint8)


def restore_zero_label(pred: np.ndarray) -> np.ndarray:
    """Undo reduce_zero_label for saving predictions in the annotation convention: class k -> k + 1."""
    return (pred.astype(np.int64) + 1).astype(np.uint8)


def load_label(path: Path, image: np.ndarray, image_path: Path, num_classes: int, reduce_zero: bool) -> np.ndarray:
    label = read_png(path, "annotation")
    check_same_size(image, label, path, image_path, "annotation")
    top = num_classes if reduce_zero else num_classes - 1  # largest raw label allowed (besides 255)
    bad = (label > top) & (label != IGNORE)
    if bad.any():
        raise DataError(f"{path}: label {int(label[bad].max())} out of range (allowed 0..{top} or 255 "
                        f"for num_classes={num_classes}, reduce_zero_label={reduce_zero})")
    return reduce_zero_label(label) if reduce_zero else label.astype(np.uint8)


class ADETrain(Dataset):
    """Training samples keyed by (index, epoch): random resize + crop (cat_max_ratio) + flip (+ photometric) + pad.
    Items: {"img": uint8 CHW, "label": uint8 HW (255 = ignore)}."""

    def __init__(self, root, split: str = "training", num_classes: int = 150, reduce_zero: bool = True,
                 crop=(512, 512), scale=(2048, 512), ratio_range=(0.5, 2.0), cat_max_ratio: float = 0.75,
                 photometric_aug: bool = True, fraction: float = 1.0, subset_seed: int = 0, aug_seed: int = 0):
        all_pairs = list_pairs(root, split)
        self.indices = subset_indices(len(all_pairs), fraction, subset_seed)
        self.pairs = [all_pairs[i] for i in self.indices]
        self.num_classes, self.reduce_zero = num_classes, reduce_zero
        self.crop, self.scale, self.ratio_range = tuple(crop), tuple(scale), tuple(ratio_range)
        self.cat_max_ratio, self.photometric, self.aug_seed = cat_max_ratio, photometric_aug, aug_seed

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        img_path, ann_path = self.pairs[index]
        img = read_rgb(img_path)
        label = load_label(ann_path, img, img_path, self.num_classes, self.reduce_zero)
        rng = sample_rng(self.aug_seed, epoch, index)
        img, label = random_resize(img, label, self.scale, self.ratio_range, rng)
        img, label = random_crop(img, label, self.crop, rng, self.cat_max_ratio)
        img, label = random_flip(img, label, rng)
        if self.photometric:
            img = photometric(np.ascontiguousarray(img), rng)
        img, label = pad_to(img, label, self.crop, IGNORE)
        return {"img": to_chw(img), "label": torch.from_numpy(np.ascontiguousarray(label))}


class ADEEval(Dataset):
    """Validation images resized keep-ratio to `test_scale` (or as is); labels at the original size.
    Items: {"img": uint8 CHW, "label": uint8 HW, "name": annotation file name}."""

    def __init__(self, root, split: str = "validation", num_classes: int = 150, reduce_zero: bool = True,
                 test_scale=(2048, 512), max_images: int | None = None):
        self.pairs = list_pairs(root, split)[:max_images]
        self.num_classes, self.reduce_zero = num_classes, reduce_zero
        self.test_scale = tuple(test_scale) if test_scale else None

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        img_path, ann_path = self.pairs[index]
        img = read_rgb(img_path)
        label = load_label(ann_path, img, img_path, self.num_classes, self.reduce_zero)
        if self.test_scale:
            img = resize_image(img, keep_ratio_size(*img.shape[:2], self.test_scale))
        return {"img": to_chw(img), "label": torch.from_numpy(label), "name": ann_path.name}
