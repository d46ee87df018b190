"""Recaption stage: `clipdense recaption --config configs/recaption/<name>.yaml`.

Web shards -> Ray Data (decode + resize on CPU tasks -> captioner actor pool: echo | coca | vllm) -> one Parquet
file per input shard beside the originals (key, caption, syn_captions[N], engine, model, prompt, sampling, error),
joined back by key; `_stats.json` holds caption quality stats. Re-runs skip shards whose output exists.
"""
from clipdense.recaption.config import DecodeConfig, EngineConfig, FaultConfig, RecaptionConfig, StatsConfig
from clipdense.recaption.run import run

__all__ = ["DecodeConfig", "EngineConfig", "FaultConfig", "RecaptionConfig", "StatsConfig", "run"]
