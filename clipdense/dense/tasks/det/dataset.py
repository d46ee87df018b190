"""COCO detection reader: `annotations/instances_<split>.json` + `<split>/<file_name>` images.

Category ids map to contiguous labels 1..C (0 = background, as torchvision detectors expect) and back when saving.
Annotations are checked when the file is read (unknown category, malformed or out-of-image box, and with `masks`
a missing segmentation -> one-line error naming the JSON file and annotation id); image sizes are checked against
the JSON, and masks (polygons, RLE, uncompressed RLE: pycocotools' annToMask) against the image, when it is read.
Training augmentation: a horizontal flip, or ViTDet's large-scale jitter (`lsj_size`: resize to fit
lsj_size x U(lsj_scale), random crop to lsj_size, flip; boxes clipped, instances left without area dropped)."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from clipdense.config import DataError
from clipdense.dense.dataset_common import read_rgb, resize_image, resize_mask, sample_rng, subset_indices, to_chw

BOX_TOLERANCE = 1.0  # pixels a box may overhang the image (rounding in exported annotations)


def load_coco(root: str | Path, split: str, masks: bool = False):
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
        if masks and not ann.get("segmentation"):
            raise DataError(f"{path}: annotation {aid}: no segmentation (head.kind mask_rcnn needs masks)")
        x, y, w, h = box
        if x < -BOX_TOLERANCE or y < -BOX_TOLERANCE or x + w > img["width"] + BOX_TOLERANCE \
                or y + h > img["height"] + BOX_TOLERANCE:
            raise DataError(f"{path}: annotation {aid}: bbox {box} lies outside image {img['file_name']} "
                            f"({img['width']}x{img['height']})")
    return coco, path


def lsj(img: np.ndarray, boxes: np.ndarray, masks: np.ndarray | None, size: int, scale_range, rng):
    """ViTDet's large-scale jitter (detectron2 ResizeScale + FixedSizeCrop): resize keep-ratio to fit
    size x U(scale_range), then a random size x size crop where larger. Returns (img, boxes, masks, kept)."""
    h, w = img.shape[:2]
    s = rng.uniform(*scale_range)
    f = min(size * s / h, size * s / w)
    nh, nw = max(1, int(h * f + 0.5)), max(1, int(w * f + 0.5))
    img = resize_image(img, (nh, nw))
    boxes = boxes * np.array([nw / w, nh / h, nw / w, nh / h], dtype=np.float32)
    if masks is not None and len(masks):
        masks = np.stack([resize_mask(m, (nh, nw)) for m in masks])
    elif masks is not None:
        masks = np.zeros((0, nh, nw), np.uint8)
    y0, x0 = int(rng.integers(0, max(nh - size, 0) + 1)), int(rng.integers(0, max(nw - size, 0) + 1))
    img = img[y0:y0 + size, x0:x0 + size]
    ch, cw = img.shape[:2]
    boxes = boxes - np.array([x0, y0, x0, y0], dtype=np.float32)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, cw)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, ch)
    kept = np.flatnonzero((boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1))
    if masks is not None:
        masks = masks[kept, y0:y0 + size, x0:x0 + size]
    return img, boxes[kept], masks, kept


class COCODetection(Dataset):
    """Items: {"img": uint8 CHW, "target": {boxes xyxy, labels 1..C, image_id, area, iscrowd[, masks uint8 NxHxW]}}.
    Training: images with at least one usable (non-crowd, w,h > 1) box, crowd boxes dropped, augmented (module
    docstring)."""

    def __init__(self, root, split: str, train: bool, fraction: float = 1.0, subset_seed: int = 0,
                 aug_seed: int = 0, max_images: int | None = None, masks: bool = False,
                 lsj_size: int | None = None, lsj_scale=(0.1, 2.0)):
        self.coco, self.ann_path = load_coco(root, split, masks)
        self.masks, self.lsj_size, self.lsj_scale = masks, lsj_size, tuple(lsj_scale)
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
        masks = self._masks(anns, info, path) if self.masks else None
        if self.train:
            rng = sample_rng(self.aug_seed, epoch, index)
            if self.lsj_size:
                img, boxes, masks, kept = lsj(img, boxes, masks, self.lsj_size, self.lsj_scale, rng)
                anns = [anns[i] for i in kept]
            if rng.random() < 0.5:
                img = img[:, ::-1]
                boxes[:, [0, 2]] = img.shape[1] - boxes[:, [2, 0]]
                masks = masks[:, :, ::-1] if masks is not None else None
        target = {
            "boxes": torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32)),
            "labels": torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.int64),
            "image_id": torch.tensor(image_id),
            "area": torch.tensor([float(a.get("area", a["bbox"][2] * a["bbox"][3])) for a in anns],
                                 dtype=torch.float32),
            "iscrowd": torch.tensor([int(a.get("iscrowd", 0)) for a in anns], dtype=torch.int64),
        }
        if masks is not None:
            target["masks"] = torch.from_numpy(np.ascontiguousarray(masks))
        return {"img": to_chw(img), "target": target}

    def _masks(self, anns: list[dict], info: dict, path: Path) -> np.ndarray:
        """Instance masks at the image size (pycocotools: polygons, RLE, uncompressed RLE), uint8 N x H x W."""
        out = []
        for a in anns:
            try:
                m = self.coco.annToMask(a)
            except Exception as e:  # pycocotools raises whatever its C code meets in a malformed segmentation
                raise DataError(f"{self.ann_path}: annotation {a.get('id')}: unreadable segmentation "
                                f"({type(e).__name__}: {str(e)[:80]})") from None
            if m.shape != (info["height"], info["width"]):
                raise DataError(f"{self.ann_path}: annotation {a.get('id')}: mask size {m.shape[1]}x{m.shape[0]} "
                                f"does not match image {path.name} ({info['width']}x{info['height']})")
            out.append(m)
        return np.stack(out).astype(np.uint8) if out else np.zeros((0, info["height"], info["width"]), np.uint8)
