"""Every image the project reads from bytes or files is opened, guarded and decoded here.

- `open_image` / `open_path`: parse the header only and apply the pixel guard (`max_pixels`, a decompression-bomb
  guard): an image declaring more pixels is refused before any pixel is decoded. PIL's process-wide
  `Image.MAX_IMAGE_PIXELS` is never changed for good: at or below PIL's limit our check alone decides; a larger
  configured limit lifts PIL's only for the duration of the call (`_pil_limit`).
- `load_rgb` / `load_pixels`: decode to RGB / in the file's own mode; `load_rgb` optionally with `Image.draft`
  (JPEG only: DCT-domain downscale at decode by 1/2, 1/4 or 1/8, never below the requested size; several times
  cheaper for photo-size JPEGs).
- `fit_square` / `fit_pixels`: the resize geometry the pipelines use; `decode_square` / `shrink_jpeg` chain them.
- `decode_crop_source`: the pretraining decode: the whole image, aspect kept, reduced only by the JPEG draft scale
  (and resampled only when still far larger than a crop needs), with its original size, so that the train collate
  draws RandomResizedCrop on the original geometry as open_clip's train transform does.
Problems raise `ImageError` (a ValueError) with a row-error code (`data.rows`) and a deterministic detail.
"""
from __future__ import annotations

import contextlib
import io
import math
import threading
import warnings
from typing import Literal

import numpy as np
from PIL import Image

from clipdense.data.rows import exception_detail

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default limit
Validate = Literal["none", "header", "full"]
_PIL_LIMIT_LOCK = threading.RLock()


class ImageError(ValueError):
    """A row-level image problem: `code` (no_image | undecodable_image | image_too_large) and `detail`."""

    def __init__(self, code: str, detail: str):
        super().__init__(f"{code}: {detail}")
        self.code, self.detail = code, detail


@contextlib.contextmanager
def _pil_limit(max_pixels: int, quiet: type[Warning] = Image.DecompressionBombWarning):
    """PIL refuses images above twice its MAX_IMAGE_PIXELS (and warns above it) wherever it looks at a size; our
    guard decides instead. Only a limit above PIL's current one lifts PIL's, for this call, under a lock, restored
    after (another thread opening an image meanwhile sees the lifted limit). Warnings of class `quiet` are muted
    (a bomb warning becomes our row error)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", quiet)
        current = Image.MAX_IMAGE_PIXELS
        if current is None or max_pixels <= current:
            yield
            return
        with _PIL_LIMIT_LOCK:
            Image.MAX_IMAGE_PIXELS = max_pixels
            try:
                yield
            finally:
                Image.MAX_IMAGE_PIXELS = current


def check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    w, h = size
    if w * h > max_pixels:
        raise ImageError("image_too_large", f"{w}x{h} > max_image_pixels={max_pixels}")


def _open(fp, max_pixels: int) -> Image.Image:
    with _pil_limit(max_pixels):
        try:
            im = Image.open(fp)
        except Image.DecompressionBombError:  # above twice PIL's limit: PIL refuses before we see the size
            raise ImageError("image_too_large", f"more than {2 * Image.MAX_IMAGE_PIXELS} pixels > "
                                                f"max_image_pixels={max_pixels}") from None
        except FileNotFoundError:
            raise
        except Exception as e:  # PIL raises many types for bad bytes
            raise ImageError("undecodable_image", exception_detail(e)) from None
    try:
        check_pixels(im.size, max_pixels)
    except ImageError:
        im.close()
        raise
    return im


def open_image(data: bytes | None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Encoded bytes -> a PIL image with only its header read, within the pixel guard."""
    if not data:
        raise ImageError("no_image", "empty image bytes")
    return _open(io.BytesIO(data), max_pixels)


def open_path(path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """An image file, header read, within the pixel guard; FileNotFoundError passes through. Use it in `with`."""
    return _open(path, max_pixels)


def load_rgb(im: Image.Image, draft_size: tuple[int, int] | None = None,
             max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode `im` to RGB; with `draft_size`, a JPEG is decoded at the smallest 1/2^k scale still >= that size."""
    try:
        with _pil_limit(max_pixels, quiet=Warning):  # also palette-with-transparency notices
            if draft_size is not None and im.format == "JPEG":
                im.draft("RGB", draft_size)
            if im.mode != "RGB":
                return im.convert("RGB")
            im.load()
            return im
    except Exception as e:
        raise ImageError("undecodable_image", exception_detail(e)) from None


def decode_rgb(data: bytes | None, max_pixels: int = DEFAULT_MAX_PIXELS,
               draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Encoded bytes -> a decoded RGB image (guarded)."""
    return load_rgb(open_image(data, max_pixels), draft_size, max_pixels)


def check_image(data: bytes | None, validate: Validate = "header",
                max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageError | None:
    """None if `data` looks usable, else the problem: "none" checks presence, "header" also parses the header and
    the pixel guard, "full" also decodes every pixel."""
    if validate == "none":
        return None if data else ImageError("no_image", "empty image bytes")
    try:
        im = open_image(data, max_pixels)
        if validate == "full":
            load_pixels(im, max_pixels)
    except ImageError as e:
        return e
    return None


def load_pixels(im: Image.Image, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode every pixel of `im`, keeping its mode (labels, 16-bit depth)."""
    try:
        with _pil_limit(max_pixels):
            im.load()
    except Exception as e:
        raise ImageError("undecodable_image", exception_detail(e)) from None
    return im


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


def decode_square(data: bytes | None, size: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                  draft: bool = True) -> np.ndarray:
    """Encoded image -> (size, size, 3) uint8: shorter side to `size`, centre crop (open_clip's eval geometry)."""
    im = open_image(data, max_pixels)
    return np.asarray(fit_square(load_rgb(im, (size, size) if draft else None, max_pixels), size), dtype=np.uint8)


def crop_source_side(size: int, min_scale: float) -> int:
    """The shorter side an image needs so that a crop of at least `min_scale` of its area, resized to `size`, is
    never upsampled: such a crop spans >= `min_scale` of each side (its area is >= min_scale * w * h and neither
    side exceeds the image's), so a shorter side >= size / min_scale keeps both crop sides >= size."""
    return math.ceil(size / min_scale)


def decode_crop_source(data: bytes | None, min_side: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                       draft: bool = True) -> tuple[np.ndarray, tuple[int, int]]:
    """Encoded image -> ((h, w, 3) uint8 of the whole image, aspect kept; its original (w, h)). A JPEG is decoded at
    the smallest DCT scale (1/2, 1/4, 1/8) whose shorter side stays >= `min_side`; an image still over twice that
    (non-JPEG, or beyond the 1/8 scale) is resized (bicubic) to shorter side `min_side`. Smaller images stay as is."""
    im = open_image(data, max_pixels)
    orig = im.size
    rgb = load_rgb(im, (min_side, min_side) if draft else None, max_pixels)
    w, h = rgb.size
    if min(w, h) > 2 * min_side:
        s = min_side / min(w, h)
        rgb = rgb.resize((max(min_side, round(w * s)), max(min_side, round(h * s))), Image.BICUBIC, reducing_gap=3.0)
    return np.asarray(rgb, dtype=np.uint8), orig


def shrink_jpeg(data: bytes | None, out_pixels: int, quality: int = 90, max_pixels: int = DEFAULT_MAX_PIXELS,
                draft: bool = True) -> bytes:
    """Encoded image -> JPEG bytes of at most `out_pixels` pixels, aspect kept; a small RGB JPEG comes back as is."""
    im = open_image(data, max_pixels)
    w, h = im.size
    s = min(1.0, math.sqrt(out_pixels / (w * h)))
    rgb = load_rgb(im, (math.ceil(w * s), math.ceil(h * s)) if draft else None, max_pixels)
    if im.format == "JPEG" and s == 1.0 and rgb is im:
        return data  # already a small RGB JPEG that decodes fully: ship the original bytes
    buf = io.BytesIO()
    fit_pixels(rgb, out_pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
