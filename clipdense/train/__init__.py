"""The one training runner (used by pretrain and dense finetune): plug a `TrainTask` into `fit` / `fit_local`."""
from clipdense.train.config import CheckpointConfig, OptimConfig, ScalingConfig, ScheduleConfig, TrainConfig
from clipdense.train.task import TrainContext, TrainTask, default_param_groups

__all__ = ["CheckpointConfig", "OptimConfig", "ScalingConfig", "ScheduleConfig", "TrainConfig", "TrainContext",
           "TrainTask", "default_param_groups", "fit", "fit_local"]


def fit(*args, **kwargs):
    from clipdense.train.runner import fit as _fit
    return _fit(*args, **kwargs)


def fit_local(*args, **kwargs):
    from clipdense.train.runner import fit_local as _fit_local
    return _fit_local(*args, **kwargs)
