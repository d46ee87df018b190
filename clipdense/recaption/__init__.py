"""Recaption stage: `clipdense recaption --config configs/recaption/<name>.yaml`.

Web shards -> Ray Data (decode + resize on CPU tasks -> captioner actor pool: echo | coca | vllm) -> one Parquet
file per input shard beside the originals (key, caption, syn_captions[N], engine, model, prompt, sampling, error),
joined back by key; `_stats.json` holds caption quality stats. Re-runs skip shards whose output exists. With
`ray.in_process` the same pipeline runs in this process without Ray (local.py).
"""
from clipdense.config.lazy import lazy_exports
from clipdense.recaption.config import DecodeConfig, EngineConfig, FaultConfig, RecaptionConfig, StatsConfig

# torch loads with `run` (the in-process pipeline), never on the captioner actors' import path (the vLLM venv)
lazy_exports(__name__, {"run": "run"})

__all__ = ["DecodeConfig", "EngineConfig", "FaultConfig", "RecaptionConfig", "StatsConfig", "run"]
