"""Tiny datasets written in the exact on-disk layouts the dense readers expect (ADE20k, NYUv2/BTS, COCO).

Scenes are learnable on purpose: a class is a colour (seg, det) and depth follows the image row and brightness."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = [(220, 40, 40), (40, 200, 60), (50, 70, 220), (230, 210, 40), (150, 50, 180)]


def _save(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, quality=95) if path.suffix == ".jpg" else Image.fromarray(arr).save(path)
    return path


def _scene(rng, h: int, w: int, num_classes: int):
    """Background grey (label 0) with 1-2 coloured rectangles (labels 1..num_classes)."""
    img = np.full((h, w, 3), 110, np.uint8) + rng.integers(0, 20, (h, w, 3), dtype=np.uint8)
    label = np.zeros((h, w), np.uint8)
    boxes = []
    for _ in range(int(rng.integers(1, 3))):
        c = int(rng.integers(1, num_classes + 1))
        bh, bw = int(rng.integers(h // 4, h // 2)), int(rng.integers(w // 4, w // 2))
        y, x = int(rng.integers(0, h - bh)), int(rng.integers(0, w - bw))
        img[y:y + bh, x:x + bw] = COLOURS[c - 1]
        label[y:y + bh, x:x + bw] = c
        boxes.append((c, x, y, bw, bh))
    return img, label, boxes


def write_ade(root, n_train: int = 6, n_val: int = 3, size=(48, 64), num_classes: int = 3, seed: int = 0) -> Path:
    """root/ADEChallengeData2016/{images,annotations}/{training,validation}/ADE_*_%08d.{jpg,png}; labels 0..K."""
    base = Path(root) / "ADEChallengeData2016"
    rng = np.random.default_rng(seed)
    for split, n, tag in (("training", n_train, "train"), ("validation", n_val, "val")):
        for i in range(n):
            img, label, _ = _scene(rng, *size, num_classes)
            _save(base / "images" / split / f"ADE_{tag}_{i + 1:08d}.jpg", img)
            _save(base / "annotations" / split / f"ADE_{tag}_{i + 1:08d}.png", label)
    return base


def write_nyu(root, n_train: int = 6, n_test: int = 3, size=(48, 64), seed: int = 0) -> Path:
    """BTS layout: root/{sync,test}/<scene>/rgb_*.jpg + sync_depth_*.png (uint16 mm; a few 0 = invalid pixels) and
    root/nyudepthv2_{train,test}_files_with_gt.txt with lines `/rgb /depth focal` relative to root."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    h, w = size
    for top, n, list_name in (("sync", n_train, "train"), ("test", n_test, "test")):
        lines = []
        for i in range(n):
            near, far = rng.uniform(1.0, 2.0), rng.uniform(4.0, 8.0)
            depth = np.linspace(far, near, h, dtype=np.float32)[:, None].repeat(w, 1)  # floor: nearer at the bottom
            depth[rng.random((h, w)) < 0.02] = 0.0
            shade = (255 * (1.0 - depth / 10.0)).clip(0, 255).astype(np.uint8)
            img = np.stack([shade, shade // 2 + 40, 255 - shade], -1)
            scene = f"room_{i // 2:04d}"
            rgb, dep = f"/{top}/{scene}/rgb_{i:05d}.jpg", f"/{top}/{scene}/sync_depth_{i:05d}.png"
            _save(root / rgb.lstrip("/"), img)
            _save(root / dep.lstrip("/"), np.round(depth * 1000).astype(np.uint16))
            lines.append(f"{rgb} {dep} 518.8579")
        (root / f"nyudepthv2_{list_name}_files_with_gt.txt").write_text("\n".join(lines) + "\n")
    return root


def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")}


def write_coco(root, n_train: int = 6, n_val: int = 3, size=(64, 64), seed: int = 0, crowd: bool = False) -> Path:
    """root/{train2017,val2017}/*.jpg + root/annotations/instances_{train,val}2017.json; category ids 1, 3, 7
    (not contiguous, to exercise the label mapping). Segmentations as real COCO has them: polygons (odd annotation
    ids) and compressed RLE (even ids) of the rectangles; `crowd` adds an iscrowd RLE region to each val image."""
    root = Path(root)
    cat_ids = [1, 3, 7]
    rng = np.random.default_rng(seed)
    ann_id = 1
    for split, n in (("train2017", n_train), ("val2017", n_val)):
        images, anns = [], []
        for i in range(n):
            img, _, boxes = _scene(rng, *size, len(cat_ids))
            name = f"{i + 1:012d}.jpg"
            _save(root / split / name, img)
            images.append({"id": i + 1, "file_name": name, "height": size[0], "width": size[1]})
            for c, x, y, bw, bh in boxes:
                mask = np.zeros(size, np.uint8)
                mask[y:y + bh, x:x + bw] = 1
                seg = [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]] if ann_id % 2 else _rle(mask)
                anns.append({"id": ann_id, "image_id": i + 1, "category_id": cat_ids[c - 1], "iscrowd": 0,
                             "bbox": [float(x), float(y), float(bw), float(bh)], "area": float(bw * bh),
                             "segmentation": seg})
                ann_id += 1
            if crowd and split == "val2017":
                mask = np.zeros(size, np.uint8)
                mask[: size[0] // 4, : size[1] // 4] = 1
                anns.append({"id": ann_id, "image_id": i + 1, "category_id": cat_ids[0], "iscrowd": 1,
                             "bbox": [0.0, 0.0, float(size[1] // 4), float(size[0] // 4)],
                             "area": float(mask.sum()), "segmentation": _rle(mask)})
                ann_id += 1
        doc = {"images": images, "annotations": anns,
               "categories": [{"id": c, "name": f"shape{c}"} for c in cat_ids]}
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))
    return root
