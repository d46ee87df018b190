"""Pretrain stage: CLIP / SigLIP / CoCa on Ray Train over (re)captioned shards, with caption policies and export.

`clipdense pretrain --config configs/pretrain/<name>.yaml [a.b=v ...]` -> `run(PretrainConfig) -> dict`.
"""
from clipdense.config.lazy import lazy_exports
from clipdense.pretrain.config import PretrainConfig

lazy_exports(__name__, {"run": "run"})  # torch and the models load with `run`

__all__ = ["PretrainConfig", "run"]
