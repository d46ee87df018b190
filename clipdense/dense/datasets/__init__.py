"""Dataset readers (ADE20k, NYUv2/BTS, COCO); each task module (dense/tasks/) builds its own from a FinetuneConfig."""
from __future__ import annotations

from clipdense.dense.datasets.ade import ADEEval, ADETrain, reduce_zero_label, restore_zero_label
from clipdense.dense.datasets.coco import COCODetection
from clipdense.dense.datasets.common import subset_indices
from clipdense.dense.datasets.nyu import NYUEval, NYUTrain

__all__ = ["ADEEval", "ADETrain", "COCODetection", "NYUEval", "NYUTrain", "reduce_zero_label", "restore_zero_label",
           "subset_indices"]
