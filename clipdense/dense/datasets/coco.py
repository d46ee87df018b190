"""COCO detection reader: `annotations/instances_<split>.json` + `<split>/<file_name>` images.

Category ids map to contiguous labels 1..C (0 = background, as torchvision detectors expect) and back when saving.
Annotations are checked when the file is read (unknown category, malformed or out-of-image box -> one-line error
naming the JSON file and annotation id); image sizes are checked against the JSON when the image is read."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from clipdense.dense.datasets.common import read_rgb, sample_rng, subset_indices, to_chw
from clipdense.errors import DataError

BOX_TOLERANCE = 1.0  # pixels a box may overhang the image (rounding in exported annotations)


def load_coco(root: str | Path, split: str):
    from pycocotools.coco import COCO

    path = Path(root) / "annotations" / f"instances_{split}.json"
    if not path.is_file():
        raise DataError(f"{path}: COCO annotation file not found")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco = COCO(str(path))
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a COCO instances file ({e})") from None
    cats = set(coco.getCatIds())
    for ann in coco.dataset.get("annotations", []):
        aid = ann.get("id")
        if ann.get("category_id") not in cats:
            raise DataError(f"{path}: annotation {aid}: category_id {ann.get('category_id')} is not in categories")
        box = ann.get("bbox")
        if not (isinstance(box, list) and len(box) == 4) or box[2] < 0 or box[3] < 0:
            raise DataError(f"{path}: annotation {aid}: bbox {box} is not [x, y, w, h] with w, h >= 0")
        img = coco.imgs.get(ann.get("image_id"))
        if img is None:
            raise DataError(f"{path}: annotation {aid}: image_id {ann.get('image_id')} is not in images")
        x, y, w, h = box
        if x < -BOX_TOLERANCE or y < -BOX_TOLERANCE or x + w > img["width"] + BOX_TOLERANCE \
                or y + h > img["height"] + BOX_TOLERANCE:
            raise DataError(f"{path}: annotation {aid}: bbox {box} lies outside image {img['file_name']} "
                            f"({img['width']}x{img['height']})")
    return coco, path


class COCODetection(Dataset):
    """Items: {"img": uint8 CHW, "target": {boxes xyxy, labels 1..C, image_id, area, iscrowd}}.
    Training: images with at least one usable (non-crowd, w,h > 1) box, random horizontal flip, crowd boxes dropped."""

    def __init__(self, root, split: str, train: bool, fraction: float = 1.0, subset_seed: int = 0,
                 aug_seed: int = 0, max_images: int | None = None):
        self.coco, self.ann_path = load_coco(root, split)
        self.image_dir = Path(root) / split
        self.cat_ids = sorted(self.coco.getCatIds())
        self.label_of = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.category_names = [self.coco.cats[c]["name"] for c in self.cat_ids]
        self.train, self.aug_seed = train, aug_seed
        ids = sorted(self.coco.getImgIds())
        if train:
            ids = [i for i in ids if any(self._usable(a) for a in self.coco.imgToAnns.get(i, []))]
            ids = [ids[i] for i in subset_indices(len(ids), fraction, subset_seed)] if ids else []
        self.image_ids = ids[:max_images]

    @staticmethod
    def _usable(ann: dict) -> bool:
        return not ann.get("iscrowd", 0) and ann["bbox"][2] > 1 and ann["bbox"][3] > 1

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, key) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        path = self.image_dir / info["file_name"]
        img = read_rgb(path)
        if img.shape[:2] != (info["height"], info["width"]):
            raise DataError(f"{path}: image size {img.shape[1]}x{img.shape[0]} does not match {self.ann_path.name} "
                            f"({info['width']}x{info['height']})")
        anns = self.coco.imgToAnns.get(image_id, [])
        if self.train:
            anns = [a for a in anns if self._usable(a)]
        boxes = np.array([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, info["width"])
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, info["height"])
        if self.train and sample_rng(self.aug_seed, epoch, index).random() < 0.5:
            img = img[:, ::-1]
            boxes[:, [0, 2]] = info["width"] - boxes[:, [2, 0]]
        target = {
            "boxes": torch.from_numpy(boxes),
            "labels": torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.int64),
            "image_id": torch.tensor(image_id),
            "area": torch.tensor([float(a.get("area", a["bbox"][2] * a["bbox"][3])) for a in anns],
                                 dtype=torch.float32),
            "iscrowd": torch.tensor([int(a.get("iscrowd", 0)) for a in anns], dtype=torch.int64),
        }
        return {"img": to_chw(img), "target": target}
