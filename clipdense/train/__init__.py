"""The one training runner (used by pretrain and dense finetune): plug a `TrainTask` into `run_training` (which
picks `fit` / `fit_local` from the stage's `TrainPlan`).

Importing it does not import Ray: the runner imports Ray only where a run goes onto Ray Train (`fit`, its workers)."""
from clipdense.config.lazy import lazy_exports
from clipdense.train.config import CheckpointConfig, OptimConfig, ScalingConfig, ScheduleConfig, TrainConfig

# torch loads with the runner and the task, not with the configs
lazy_exports(__name__, {**dict.fromkeys(("TrainPlan", "fit", "fit_local", "run_training"), "runner"),
                        **dict.fromkeys(("TrainContext", "TrainTask", "default_param_groups"), "task")})

__all__ = ["CheckpointConfig", "OptimConfig", "ScalingConfig", "ScheduleConfig", "TrainConfig", "TrainContext",
           "TrainPlan", "TrainTask", "default_param_groups", "fit", "fit_local", "run_training"]
