"""`echo`: N copies of the original caption. For plumbing tests and pipeline-overhead benchmarks only."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from clipdense.recaption.engines.base import Captioner, ImageLike
from clipdense.recaption.engines.registry import EngineSpec, register_engine

if TYPE_CHECKING:
    from clipdense.recaption.config import EngineConfig


class EchoCaptioner(Captioner):
    kind = "echo"

    def generate(self, images: Sequence[ImageLike], n: int, captions: Sequence[str | None] | None = None,
                 keys: Sequence[str] | None = None) -> list[list[str]]:
        if captions is None or len(captions) != len(images):
            raise ValueError("the echo engine needs one original caption per image")
        return [[c or ""] * n for c in captions]


def build_echo(cfg: EngineConfig) -> EchoCaptioner:
    return EchoCaptioner()


def echo_sampling(cfg: EngineConfig) -> dict:
    return {"n": cfg.samples}


ECHO = register_engine(EngineSpec(name="echo", build=build_echo, sampling=echo_sampling, default_model="echo"))
