"""The dense tasks, one package each, DINOv2-style: `tasks/<task>/` holds the task's config, dataset, head, loss and
metric, and `task.py`, its `TaskKind` (what the generic `DenseTask` asks of it: datasets, head, collate, loss,
evaluator, default metric). `TASKS` is their table; the generic training task (dense/task.py), the datasets'
builders and the sweep read them from here."""
from __future__ import annotations

from clipdense.dense.tasks.base import TaskKind
from clipdense.dense.tasks.depth.task import DepthTask
from clipdense.dense.tasks.det.task import DetTask
from clipdense.dense.tasks.seg.task import SegTask

TASKS: dict[str, TaskKind] = {t.name: t for t in (SegTask(), DepthTask(), DetTask())}


def task_of(cfg) -> TaskKind:
    return TASKS[cfg.task]


def build_train_dataset(cfg):
    return task_of(cfg).train_dataset(cfg)


def build_eval_dataset(cfg):
    return task_of(cfg).eval_dataset(cfg)


__all__ = ["TASKS", "TaskKind", "build_eval_dataset", "build_train_dataset", "task_of"]
