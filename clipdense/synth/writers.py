"""Byte-exact writers for the five synthetic datasets, one generation job at a time.

Each job (a web/curated shard, a chunk of ADE or COCO images, one NYU scene) runs in a pool worker, writes
its own files atomically, and returns small records the parent merges (COCO annotations, NYU file lists,
class statistics). Every image draws from its own RNG seeded by (seed, dataset, split, index), so the bytes
do not depend on the number of workers or on job boundaries.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from clipdense.data.layouts import atomic_write, tar_bytes

from .captions import alt_text_with_info, describe
from .render import Rendered, render
from .scene import FOCAL, TYPICAL_COLOUR, K, Scene, sample_background, sample_scene

# Stable stream ids (never Python's hash(): it is salted per process).
DATASET_IDS = {"web": 1, "curated": 2, "ade": 3, "nyu": 4, "coco": 5}
SPLIT_IDS = {"train": 0, "val": 1, "test": 1}
COCO_MIN_AREA = 16  # visible pixels; smaller fragments get no COCO annotation (they stay in ADE labels)
NYU_FRAMES_PER_SCENE = 16


class Job(NamedTuple):
    kind: str  # web | curated | ade | nyu | coco
    split: str  # train | val | test
    unit: int  # shard index (web/curated), chunk index (ade/coco), scene index (nyu)
    start: int  # first global image index of the split
    count: int
    out: str
    seed: int
    size: int
    quality: int
    max_objects: int


def image_rng(job: Job, index: int, stream: int = 0) -> np.random.Generator:
    return np.random.default_rng([job.seed, DATASET_IDS[job.kind], SPLIT_IDS[job.split], stream, index])


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_png(arr: np.ndarray) -> bytes:
    """uint8 -> mode L, uint16 -> mode I;16 PNG."""
    if arr.dtype not in (np.uint8, np.uint16):
        raise TypeError(f"PNG labels/depth must be uint8 or uint16, got {arr.dtype}")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()






def _dumps(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def web_shard(job: Job) -> dict:
    """One img2dataset-style shard: KEY.jpg, KEY.txt (caption), KEY.json (metadata).

    web: the caption is the noisy alt text. curated: the caption is the complete description.
    In both, json["description"] and json["scene"] hold the ground truth for scoring only, never training.
    """
    members, mentioned, colour_ok = [], 0, 0
    for j in range(job.count):
        index = job.start + j
        rng = image_rng(job, index)
        scene = sample_scene(rng, job.max_objects)
        rgb = render(scene, job.size).rgb
        alt, info = alt_text_with_info(scene, rng)
        description = describe(scene)
        caption = alt if job.kind == "web" else description
        key = f"{job.unit:05d}{j:04d}"
        jpg = encode_jpeg(rgb, job.quality)
        meta = {"url": None, "key": key, "status": "success", "error_message": None, "caption": caption,
                "width": job.size, "height": job.size, "original_width": job.size,
                "original_height": job.size, "exif": None, "description": description,
                "scene": scene.to_dict()}
        if job.kind == "web":
            meta["alt"] = info
            mentioned += info["mentioned"] is not None
            colour_ok += bool(info["colour_correct"])
        members += [(f"{key}.jpg", jpg), (f"{key}.txt", caption.encode()), (f"{key}.json", _dumps(meta))]
    folder = Path(job.out) / job.kind
    atomic_write(folder / f"{job.unit:05d}.tar", tar_bytes(members))
    stats = {"count": job.count, "successes": job.count, "failed_to_download": 0, "failed_to_resize": 0,
             "status_dict": {"success": job.count}}
    atomic_write(folder / f"{job.unit:05d}_stats.json", _dumps(stats))
    return {"images": job.count, "alt_mentioned": mentioned, "alt_colour_correct": colour_ok}


def atypical_mask(scene: Scene, rendered: Rendered) -> np.ndarray:
    """uint8 H x W: 1 on the visible pixels of the objects whose colour is not their class's typical one."""
    mask = np.zeros(rendered.seg.shape, dtype=np.uint8)
    for obj, visible in zip(scene.objects, rendered.masks):
        if obj.colour != TYPICAL_COLOUR[obj.shape]:
            mask[visible] = 1
    return mask


def ade_chunk(job: Job) -> dict:
    """ADEChallengeData2016 layout: images/{training,validation}/ADE_*.jpg + annotations/.../ADE_*.png; for
    validation also atypical/validation/ADE_*.png (`atypical_mask`), outside the layout's own folders."""
    split_dir = "training" if job.split == "train" else "validation"
    prefix = "ADE_train_" if job.split == "train" else "ADE_val_"
    root = Path(job.out) / "ade" / "ADEChallengeData2016"
    pixels = np.zeros(K + 1, dtype=np.int64)
    present = np.zeros(K + 1, dtype=np.int64)
    for j in range(job.count):
        index = job.start + j
        scene = sample_scene(image_rng(job, index), job.max_objects)
        r = render(scene, job.size)
        name = f"{prefix}{index + 1:08d}"
        atomic_write(root / "images" / split_dir / f"{name}.jpg", encode_jpeg(r.rgb, job.quality))
        atomic_write(root / "annotations" / split_dir / f"{name}.png", encode_png(r.seg))
        if job.split != "train":  # scores seg on atypically coloured objects (never trains)
            atomic_write(root / "atypical" / split_dir / f"{name}.png", encode_png(atypical_mask(scene, r)))
        counts = np.bincount(r.seg.ravel(), minlength=K + 1)
        pixels += counts
        present += counts > 0
    return {"images": job.count, "pixels": pixels.tolist(), "present": present.tolist()}


def nyu_scene(job: Job) -> dict:
    """One BTS-style NYUv2 scene folder: frames share the room (camera, wall, floor), objects vary."""
    top = "sync" if job.split == "train" else "test"
    scene_dir = f"scene_{job.unit + 1:04d}"
    folder = Path(job.out) / "nyu" / top / scene_dir
    room = sample_background(image_rng(job, job.unit, stream=1))
    focal = FOCAL * job.size
    lines, lo, hi = [], np.inf, -np.inf
    for j in range(job.count):
        index = job.start + j
        scene = sample_scene(image_rng(job, index), job.max_objects, background=room)
        r = render(scene, job.size)
        depth_mm = np.round(r.depth * 1000.0).astype(np.uint16)
        rgb_name, depth_name = f"rgb_{index + 1:05d}.jpg", f"sync_depth_{index + 1:05d}.png"
        atomic_write(folder / rgb_name, encode_jpeg(r.rgb, job.quality))
        atomic_write(folder / depth_name, encode_png(depth_mm))
        lines.append(f"/{top}/{scene_dir}/{rgb_name} /{top}/{scene_dir}/{depth_name} {focal:.4f}")
        lo, hi = min(lo, float(r.depth.min())), max(hi, float(r.depth.max()))
    return {"images": job.count, "lines": lines, "depth_min": lo, "depth_max": hi}


def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def coco_chunk(job: Job) -> dict:
    """COCO images plus per-image annotations of the VISIBLE part of every object (ids assigned by the parent)."""
    folder = Path(job.out) / "coco" / ("train2017" if job.split == "train" else "val2017")
    records = []
    for j in range(job.count):
        index = job.start + j
        scene = sample_scene(image_rng(job, index), job.max_objects)
        r = render(scene, job.size)
        image_id = index + 1
        file_name = f"{image_id:012d}.jpg"
        atomic_write(folder / file_name, encode_jpeg(r.rgb, job.quality))
        anns = []
        for obj, mask in zip(scene.objects, r.masks):
            area = int(mask.sum())
            if area < COCO_MIN_AREA:
                continue
            rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
            x, y = int(cols[0]), int(rows[0])
            w, h = int(cols[-1]) - x + 1, int(rows[-1]) - y + 1
            anns.append({"image_id": image_id, "category_id": obj.label, "bbox": [x, y, w, h], "area": area,
                         "iscrowd": 0, "segmentation": _rle(mask), "depth": round(obj.depth, 4)})
        image = {"id": image_id, "file_name": file_name, "width": job.size, "height": job.size}
        records.append((image, anns))
    return {"images": job.count, "records": records}


RUNNERS = {"web": web_shard, "curated": web_shard, "ade": ade_chunk, "nyu": nyu_scene, "coco": coco_chunk}


def run_job(job: Job) -> dict:
    return RUNNERS[job.kind](job)
