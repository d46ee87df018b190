"""The captioner interface: a small pure API that tests call without Ray.

`Captioner.generate(images, n, captions=None, keys=None) -> list[list[str]]`: for each image, `n` captions. Images
are PIL images or uint8 HxWx3 arrays (what the pipeline's CPU stage produces); `captions` are the original captions
(only the echo engine reads them); `keys` are the rows' keys, which seed each row's sampling (so a caption does not
depend on batching, actors or order).
"""
from __future__ import annotations

import abc
from typing import Any, Sequence, Union

import numpy as np
from PIL import Image

from clipdense.data.images import decode_rgb

ImageLike = Union[Image.Image, np.ndarray, bytes]


class EngineOutputError(RuntimeError):
    """The engine returned something other than n strings per image."""


class Captioner(abc.ABC):
    kind: str = ""

    @abc.abstractmethod
    def generate(self, images: Sequence[ImageLike], n: int, captions: Sequence[str | None] | None = None,
                 keys: Sequence[str] | None = None) -> list[list[str]]:
        """n captions for each image, in order."""

    def close(self) -> None:
        """Free the engine's resources (GPU memory); optional."""
        return None


def to_pil(image: ImageLike) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    if isinstance(image, (bytes, bytearray, memoryview)):
        return decode_rgb(bytes(image))  # guarded like every image the project opens
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected a uint8 HxWx3 array, got {arr.dtype} {arr.shape}")
    return Image.fromarray(arr)


def cut_caption(text: str, at_period: bool) -> str:
    """DataCompDR's post-processing: keep the text before the first period; normalise whitespace."""
    if at_period:
        text = text.split(".")[0]
    return " ".join(text.split())


def check_output(out: Any, n_images: int, n: int) -> list[list[str]]:
    """Validate an engine's result shape: list of n_images lists of n strings."""
    if not isinstance(out, list) or len(out) != n_images:
        got = len(out) if isinstance(out, list) else type(out).__name__
        raise EngineOutputError(f"engine returned {got} results for {n_images} images")
    for caps in out:
        if not isinstance(caps, list) or len(caps) != n or not all(isinstance(c, str) for c in caps):
            raise EngineOutputError(f"engine returned {caps!r:.80} where {n} strings were expected")
    return out
