"""The dense tasks, one module each (its dataset, model head, loss, collate, evaluator and default metric), in one
table. The generic training task (dense/task.py), the datasets' builders and the sweep read them from here."""
from __future__ import annotations

from clipdense.dense.tasks.base import TaskKind
from clipdense.dense.tasks.depth import DepthTask
from clipdense.dense.tasks.det import DetTask
from clipdense.dense.tasks.seg import SegTask

TASKS: dict[str, TaskKind] = {t.name: t for t in (SegTask(), DepthTask(), DetTask())}


def task_of(cfg) -> TaskKind:
    return TASKS[cfg.task]


def build_train_dataset(cfg):
    return task_of(cfg).train_dataset(cfg)


def build_eval_dataset(cfg):
    return task_of(cfg).eval_dataset(cfg)


__all__ = ["TASKS", "TaskKind", "build_eval_dataset", "build_train_dataset", "task_of"]
