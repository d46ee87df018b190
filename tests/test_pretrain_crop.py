"""Pretraining crop = open_clip's train transform: RandomResizedCrop on the full image, bicubic (torchvision on PIL)."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode, RandomResizedCrop

from clipdense.data.images import ImageError, crop_source_side, decode_crop_source
from clipdense.pretrain.batches import Collate
from clipdense.pretrain.captions import sample_rng
from clipdense.pretrain.crops import CROP_RATIO, CROP_SCALE, crop_box, resized_crop, source_box


def _photo(w: int, h: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients + noise: JPEG sizes and detail like a photo's."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(rng.uniform(0.2, 1) * yy + rng.uniform(0.2, 1) * xx) % 256 for _ in range(3)], -1)
    return (img + rng.normal(0, 12, img.shape)).clip(0, 255).astype(np.uint8)


def _encode(img: np.ndarray, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _torchvision(pil: Image.Image, box, size: int) -> np.ndarray:
    x1, y1, x2, y2 = box
    return np.asarray(TF.resized_crop(pil, y1, x1, y2 - y1, x2 - x1, [size, size], InterpolationMode.BICUBIC))


@pytest.mark.parametrize("size", [64, 160])  # a downscaling and an upscaling crop
def test_crop_equals_torchvision_resized_crop_on_pil(size):
    data = _encode(_photo(120, 90))
    pixels, orig = decode_crop_source(data, crop_source_side(size, CROP_SCALE[0]))
    pil = Image.open(io.BytesIO(data)).convert("RGB")
    assert orig == (120, 90) and np.array_equal(pixels, np.asarray(pil))  # small: decoded whole, untouched
    for seed in range(6):
        box = crop_box(np.random.default_rng(seed), 90, 120)
        ours = resized_crop(pixels, source_box(box, *orig, 120, 90), size).permute(1, 2, 0).numpy()
        ref = _torchvision(pil, box, size)
        diff = np.abs(ours.astype(int) - ref.astype(int))
        assert diff.max() <= 1 and diff.mean() < 0.05, (seed, diff.max(), diff.mean())


def _ks(a, b) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    return float(np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b)).max())


@pytest.mark.parametrize("w,h", [(320, 240), (168, 240), (120, 400)])  # tall: get_params' fallback at times, always
def test_box_distribution_matches_torchvision_get_params(w, h):
    n = 3000
    ours = np.array([crop_box(sample_rng(0, 0, f"k{i}", 2), h, w) for i in range(n)], dtype=float)
    torch.manual_seed(0)
    img = torch.empty(3, h, w)
    ref = []
    for _ in range(n):
        top, left, ch, cw = RandomResizedCrop.get_params(img, list(CROP_SCALE), list(CROP_RATIO))
        ref.append((left, top, left + cw, top + ch))
    ref = np.array(ref, dtype=float)
    for boxes in (ours, ref):
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    stats = lambda b: {"area": (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) / (w * h),  # noqa: E731
                       "log_aspect": np.log((b[:, 2] - b[:, 0]) / (b[:, 3] - b[:, 1])), "x1": b[:, 0], "y1": b[:, 1]}
    for name, (a, b) in {k: (stats(ours)[k], stats(ref)[k]) for k in ("area", "log_aspect", "x1", "y1")}.items():
        assert _ks(a, b) < 0.05, name  # same distribution (the 1% critical value at n=3000 is ~0.042)
    assert abs(stats(ours)["area"].min() - stats(ref)["area"].min()) < 0.01


def test_decode_reduces_large_jpegs_by_draft_only_to_what_the_crop_needs():
    side = crop_source_side(224, CROP_SCALE[0])
    assert side == math.ceil(224 / 0.9)
    big = _photo(1200, 900)
    px, orig = decode_crop_source(_encode(big), side)
    assert orig == (1200, 900) and px.shape == (450, 600, 3)  # the 1/2 DCT scale; 1/4 would go below `side`
    small, orig = decode_crop_source(_encode(big), 30)  # the 1/8 scale still > 2x the side: resized to it
    assert orig == (1200, 900) and small.shape == (30, 40, 3)
    png, orig = decode_crop_source(_encode(big, "PNG"), side)  # no draft for PNG: resized once
    assert orig == (1200, 900) and png.shape[:2] == (side, round(1200 * side / 900))
    with pytest.raises(ImageError) as e:
        decode_crop_source(_encode(big), side, max_pixels=1000 * 900)
    assert e.value.code == "image_too_large"


def test_crop_of_a_reduced_image_tracks_the_full_resolution_crop():
    """The box is drawn on the original geometry and mapped to the draft-decoded copy: the crop shows the same
    region as torchvision's on the full image (only the DCT-domain downscale's filter differs)."""
    data = _encode(_photo(1000, 760, seed=3))
    pixels, (ow, oh) = decode_crop_source(data, crop_source_side(224, CROP_SCALE[0]))
    assert pixels.shape[:2] == (380, 500)
    full = Image.open(io.BytesIO(data)).convert("RGB")
    for seed in range(4):
        box = crop_box(np.random.default_rng(seed), oh, ow)
        ours = resized_crop(pixels, source_box(box, ow, oh, 500, 380), 224).permute(1, 2, 0).numpy().astype(int)
        diff = np.abs(ours - _torchvision(full, box, 224).astype(int)).mean()
        dx = 24 if box[2] + 24 <= ow else -24  # the same crop 24 px off: what a mis-mapped box would show
        shifted = np.abs(ours - _torchvision(full, (box[0] + dx, box[1], box[2] + dx, box[3]), 224)).mean()
        assert diff < 2 and shifted > 3 * diff, (seed, diff, shifted)


def test_collate_crops_variable_sizes_from_original_geometry():
    rows = [decode_crop_source(_encode(_photo(w, h, i)), crop_source_side(32, CROP_SCALE[0]))
            for i, (w, h) in enumerate([(48, 40), (300, 200), (40, 64)])]
    pixels = np.empty(3, dtype=object)
    for i, (px, _) in enumerate(rows):
        pixels[i] = px
    batch = {"key": np.array(["a", "b", "c"], dtype=object), "caption": np.array(["x", "y", "z"], dtype=object),
             "syn_captions": np.array([None] * 3, dtype=object), "pixels": pixels,
             "orig_w": np.array([o[0] for _, o in rows]), "orig_h": np.array([o[1] for _, o in rows])}
    mk = lambda epoch: Collate(model_name="clip-tiny", image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3,  # noqa: E731
                               policy="real", seed=7, epoch=epoch)
    a, b, c = mk(0)(batch), mk(0)(batch), mk(1)(batch)
    assert a["image"].shape == (3, 3, 32, 32) and torch.equal(a["image"], b["image"])
    assert not torch.equal(a["image"], c["image"])
    i = 1  # the 300x200 row, draft-decoded at 1/4: the box is drawn on 300x200, then mapped
    assert rows[i][0].shape == (50, 75, 3)
    box = source_box(crop_box(sample_rng(7, 0, "b", 2), 200, 300), 300, 200, 75, 50)
    ref = _torchvision(Image.fromarray(rows[i][0]), box, 32)
    expect = (torch.from_numpy(ref).permute(2, 0, 1).float() / 255 - 0.5) / 0.25
    assert (a["image"][i] - expect).abs().max() <= 1 / 255 / 0.25 + 1e-5
