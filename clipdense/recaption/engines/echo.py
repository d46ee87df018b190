"""`echo`: N copies of the original caption. For plumbing tests and pipeline-overhead benchmarks only."""
from __future__ import annotations

from typing import Sequence

from clipdense.recaption.engines.base import Captioner, ImageLike


class EchoCaptioner(Captioner):
    kind = "echo"

    def generate(self, images: Sequence[ImageLike], n: int, captions: Sequence[str | None] | None = None,
                 keys: Sequence[str] | None = None) -> list[list[str]]:
        if captions is None or len(captions) != len(images):
            raise ValueError("the echo engine needs one original caption per image")
        return [[c or ""] * n for c in captions]
