"""Pretrain stage: CLIP / SigLIP / CoCa on Ray Train over (re)captioned shards, with caption policies and export.

`clipdense pretrain --config configs/pretrain/<name>.yaml [a.b=v ...]` -> `run(PretrainConfig) -> dict`.
"""
from clipdense.pretrain.config import PretrainConfig
from clipdense.pretrain.run import run

__all__ = ["PretrainConfig", "run"]
