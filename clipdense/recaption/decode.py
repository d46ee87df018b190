"""CPU stage of the recaption pipeline: decode + resize images in Ray Data tasks, ahead of the captioner actors.

`prepare_image` is the per-image step (also what bench/recaption_echo.py times as the plain baseline), built from
data/images.py, which owns opening, the pixel guard and decoding; `prepare_images` applies it to a batch's rows
(pipeline.decode_batch, the Ray Data task, wraps them as Arrow columns).
Two output forms, chosen by the engine:
- "array": a fixed-size square uint8 HxWx3 (shorter side resized to `size`, centre crop, bicubic), like open_clip's
  eval transform minus normalisation (the actor normalises on its device), stored as a Ray tensor column `pixels`;
- "jpeg":  the image downscaled (aspect kept) to at most `max_pixels` and re-encoded as a small JPEG
  (`image_jpeg`), for VLMs whose processor wants variable-size images.
Bad images become error rows (`undecodable_image`, `image_too_large`, ...), never exceptions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from clipdense.data.images import DEFAULT_MAX_PIXELS, ImageError, decode_square, shrink_jpeg
from clipdense.data.rows import RowError, row_error


@dataclass(frozen=True)
class ImageInput:
    mode: Literal["array", "jpeg"] = "array"
    size: int = 224                 # array mode: square side
    max_pixels: int = 448 * 448     # jpeg mode: pixel cap
    jpeg_quality: int = 90
    max_image_pixels: int = DEFAULT_MAX_PIXELS


def prepare_image(data: bytes | None, spec: ImageInput) -> np.ndarray | bytes:
    """Encoded image bytes -> uint8 (size, size, 3) array or small JPEG bytes; raises ImageError."""
    if spec.mode == "array":
        return decode_square(data, spec.size, spec.max_image_pixels)
    return shrink_jpeg(data, spec.max_pixels, spec.jpeg_quality, spec.max_image_pixels)


def prepare_images(datas: list[bytes | None], errors: list[RowError | None], shards: list[str | None],
                   spec: ImageInput, alloc=np.empty) -> np.ndarray | list[bytes | None]:
    """The images of the rows not in error: uint8 (n, size, size, 3) (array mode; the array from `alloc(shape,
    dtype)`, e.g. one in shared memory) or small JPEGs (jpeg mode). A row whose image fails gets its row error in
    `errors` (updated in place) and zeros / None."""
    n = len(datas)
    pixels = alloc((n, spec.size, spec.size, 3), np.uint8) if spec.mode == "array" else None
    jpegs: list[bytes | None] = [None] * n
    for i in range(n):
        if errors[i] is not None:
            if pixels is not None:
                pixels[i] = 0
            continue
        try:
            out = prepare_image(datas[i], spec)
        except ImageError as e:
            errors[i] = row_error(e.code, e.detail, shards[i])
            if pixels is not None:
                pixels[i] = 0
            continue
        if pixels is not None:
            pixels[i] = out
        else:
            jpegs[i] = out
    return pixels if pixels is not None else jpegs
