"""Evaluation stage: zero-shot classification on an ImageFolder and image-text retrieval on shards."""
from clipdense.eval.config import EvalStageConfig, ZeroShotConfig
from clipdense.eval.run import run

__all__ = ["EvalStageConfig", "ZeroShotConfig", "run"]
