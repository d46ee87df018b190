"""Dataset readers (ADE20k, NYUv2/BTS, COCO); each task module (dense/tasks/) builds its own from a FinetuneConfig."""
from __future__ import annotations

from clipdense.dense.datasets.ade import ADEEval, ADETrain, reduce_zero_label, restore_zero_label
from clipdense.dense.datasets.coco import COCODetection
from clipdense.dense.datasets.common import subset_indices
from clipdense.dense.datasets.nyu import NYUEval, NYUTrain

__all__ = ["ADEEval", "ADETrain", "COCODetection", "NYUEval", "NYUTrain", "build_eval_dataset",
           "build_train_dataset", "reduce_zero_label", "restore_zero_label", "subset_indices"]


def build_train_dataset(cfg):
    from clipdense.dense.tasks import build_train_dataset as build

    return build(cfg)


def build_eval_dataset(cfg):
    from clipdense.dense.tasks import build_eval_dataset as build

    return build(cfg)
