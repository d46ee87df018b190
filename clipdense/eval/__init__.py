"""Evaluation stage: zero-shot classification on an ImageFolder and image-text retrieval on shards."""
from clipdense.config.lazy import lazy_exports
from clipdense.eval.config import EvalStageConfig, ZeroShotConfig

lazy_exports(__name__, {"run": "run"})  # torch and open_clip load with `run`

__all__ = ["EvalStageConfig", "ZeroShotConfig", "run"]
