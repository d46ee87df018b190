"""Each task's evaluator and re-scorer live in its package (dense/tasks/<task>/task.py); these names stay importable
from here (README and docs/dense.md name `clipdense.dense.evaluate.rescore_det`)."""
from clipdense.dense.tasks.depth.task import evaluate_depth, rescore_depth
from clipdense.dense.tasks.det.task import coco_results, evaluate_det, rescore_det
from clipdense.dense.tasks.seg.task import evaluate_seg, rescore_seg

__all__ = ["coco_results", "evaluate_depth", "evaluate_det", "evaluate_seg", "rescore_depth", "rescore_det",
           "rescore_seg"]
