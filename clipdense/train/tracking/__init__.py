"""Watching a run: progress lines in the terminal and experiment trackers (TensorBoard, MLflow, W&B), rank 0 only.

One `tracking` section (config.py) serves pretrain, finetune and sweep. The training loop hands every record it
writes to `metrics.jsonl` to `RunWatchers.write` (watchers.py), which prints a progress line (progress.py; on Ray
Train: relays it to the driver, see train/driver_progress.py) and forwards the numbers to the trackers, one module
each (tensorboard.py, mlflow.py, wandb.py). Trackers are optional extras (`pip install "clipdense[tracking]"`).
"""
from clipdense.train.tracking.config import (
    EXTRA,
    MlflowConfig,
    TrackingConfig,
    WandbConfig,
    absolute_store_uri,
    file_store_path,
    is_local_store,
    require,
)
from clipdense.train.tracking.mlflow import open_mlflow_store, short_mlflow_timeouts
from clipdense.train.tracking.progress import Progress
from clipdense.train.tracking.watchers import RunWatchers, check_installed

__all__ = ["EXTRA", "MlflowConfig", "Progress", "RunWatchers", "TrackingConfig", "WandbConfig", "absolute_store_uri",
           "check_installed", "file_store_path", "is_local_store", "open_mlflow_store", "require",
           "short_mlflow_timeouts"]
