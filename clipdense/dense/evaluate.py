"""Each task's evaluator and re-scorer live in its module (dense/tasks/); these names stay importable from here."""
from clipdense.dense.tasks.depth import evaluate_depth, rescore_depth
from clipdense.dense.tasks.det import coco_results, evaluate_det, rescore_det
from clipdense.dense.tasks.seg import evaluate_seg, rescore_seg

__all__ = ["coco_results", "evaluate_depth", "evaluate_det", "evaluate_seg", "rescore_depth", "rescore_det",
           "rescore_seg"]
