"""CPU stage of the recaption pipeline: decode + resize images in Ray Data tasks, ahead of the captioner actors.

`prepare_image` is the pure per-image step (also what bench/recaption_echo.py times as the plain baseline);
`decode_batch` applies it to an Arrow batch. Two output forms, chosen by the engine:
- "array": a fixed-size square uint8 HxWx3 (shorter side resized to `size`, centre crop, bicubic), like open_clip's
  eval transform minus normalisation (the actor normalises on its device), stored as a Ray tensor column `pixels`;
- "jpeg":  the image downscaled (aspect kept) to at most `max_pixels` and re-encoded as a small JPEG
  (`image_jpeg`), for VLMs whose processor wants variable-size images.
Bad images become error rows ("undecodable image (...)", "image too large (...)"), never exceptions.
"""
from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
from PIL import Image

Image.MAX_IMAGE_PIXELS = None  # our own guard (ImageInput.max_image_pixels) decides, with a row error


@dataclass(frozen=True)
class ImageInput:
    mode: Literal["array", "jpeg"] = "array"
    size: int = 224                 # array mode: square side
    max_pixels: int = 448 * 448     # jpeg mode: pixel cap
    jpeg_quality: int = 90
    max_image_pixels: int = 89_478_485


class ImageError(ValueError):
    """A row-level image problem; the message is the row's error reason."""


def open_image(data: bytes | None, max_image_pixels: int) -> Image.Image:
    if not data:
        raise ImageError("no image")
    try:
        im = Image.open(io.BytesIO(data))
    except Exception as e:  # PIL raises many types for bad bytes
        raise ImageError(f"undecodable image ({type(e).__name__}: {str(e)[:80]})") from None
    w, h = im.size
    if w * h > max_image_pixels:
        raise ImageError(f"image too large ({w}x{h} > max_image_pixels={max_image_pixels})")
    return im


def _load_rgb(im: Image.Image, draft_size: tuple[int, int] | None) -> Image.Image:
    try:
        if draft_size is not None and im.format == "JPEG":
            im.draft("RGB", draft_size)  # DCT-domain downscale: decodes big JPEGs several times faster
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # palette-with-transparency notices
            if im.mode != "RGB":
                return im.convert("RGB")
            im.load()
            return im
    except Exception as e:
        raise ImageError(f"undecodable image ({type(e).__name__}: {str(e)[:80]})") from None


def fit_square(im: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to `size` and centre-crop to size x size (one resample with a crop box)."""
    w, h = im.size
    side = min(w, h)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    return im.resize((size, size), Image.BICUBIC, box=box, reducing_gap=None if side < 3 * size else 3.0)


def fit_pixels(im: Image.Image, max_pixels: int) -> Image.Image:
    """Downscale keeping the aspect ratio so that w*h <= max_pixels (never upscale)."""
    w, h = im.size
    if w * h <= max_pixels:
        return im
    s = math.sqrt(max_pixels / (w * h))
    return im.resize((max(1, int(w * s)), max(1, int(h * s))), Image.BICUBIC, reducing_gap=3.0)


def prepare_image(data: bytes | None, spec: ImageInput) -> np.ndarray | bytes:
    """Encoded image bytes -> uint8 (size, size, 3) array or small JPEG bytes; raises ImageError."""
    im = open_image(data, spec.max_image_pixels)
    if spec.mode == "array":
        return np.asarray(fit_square(_load_rgb(im, (spec.size, spec.size)), spec.size), dtype=np.uint8)
    w, h = im.size
    s = min(1.0, math.sqrt(spec.max_pixels / (w * h)))
    rgb = _load_rgb(im, (math.ceil(w * s), math.ceil(h * s)))
    if im.format == "JPEG" and s == 1.0 and rgb is im:
        return data  # already a small RGB JPEG that decodes fully: ship the original bytes
    buf = io.BytesIO()
    fit_pixels(rgb, spec.max_pixels).save(buf, format="JPEG", quality=spec.jpeg_quality)
    return buf.getvalue()


def decode_batch(batch: pa.Table, spec: ImageInput, keep_images: bool = False) -> pa.Table:
    """Ray Data CPU stage: canonical rows -> key, caption, error, shard + `pixels` or `image_jpeg`
    (+ image_bytes when kept). Rows already in error pass through; new problems are recorded in `error`."""
    from ray.data.extensions import ArrowTensorArray

    datas = batch.column("image_bytes").to_pylist()
    errors = batch.column("error").to_pylist()
    captions = batch.column("caption").to_pylist()
    shards = batch.column("shard").to_pylist()
    n = len(datas)
    pixels = np.zeros((n, spec.size, spec.size, 3), np.uint8) if spec.mode == "array" else None
    jpegs: list[bytes | None] = [None] * n
    for i in range(n):
        if errors[i] is not None:
            continue
        if not (captions[i] or "").strip():
            errors[i] = f"no caption [{shards[i]}]"
            continue
        try:
            out = prepare_image(datas[i], spec)
        except ImageError as e:
            errors[i] = f"{e} [{shards[i]}]"
            continue
        if pixels is not None:
            pixels[i] = out
        else:
            jpegs[i] = out
    cols = {"key": batch.column("key"), "caption": batch.column("caption"),
            "error": pa.array(errors, pa.string()), "shard": batch.column("shard")}
    if pixels is not None:
        cols["pixels"] = ArrowTensorArray.from_numpy(pixels)
    else:
        cols["image_jpeg"] = pa.array(jpegs, pa.binary())
    if keep_images:
        cols["image_bytes"] = batch.column("image_bytes")
    return pa.table(cols)
