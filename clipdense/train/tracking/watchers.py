"""Watching a run from rank 0: `RunWatchers` prints progress and forwards every record's numbers to the configured
trackers; `check_installed` fails before a run starts (in the driver) when a tracker cannot work as configured.

A tracker that fails mid-run (its server went away, a disk filled) is warned about once and switched off, never
allowed to stop or stall training. A tracker that cannot start because of its configuration (an MLflow URI no store
takes, a store directory that cannot be written) is a one-line ConfigError before the run starts.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

from clipdense.config import ConfigError
from clipdense.train.tracking.config import TrackingConfig, require
from clipdense.train.tracking.mlflow import MlflowTracker, open_mlflow_store
from clipdense.train.tracking.progress import Progress
from clipdense.train.tracking.tensorboard import TensorBoardTracker
from clipdense.train.tracking.wandb import WandbTracker


def check_installed(cfg: TrackingConfig) -> None:
    """Fail before a run starts (in the driver) if a configured tracker's library is missing, or its MLflow store
    cannot work as configured."""
    if cfg.tensorboard:
        require("torch.utils.tensorboard", "tracking.tensorboard")
    if cfg.mlflow is not None:
        open_mlflow_store(cfg.mlflow.tracking_uri)
    if cfg.wandb is not None:
        require("wandb", "tracking.wandb")


def _scalars(record: dict) -> dict[str, float]:
    return {k: float(v) for k, v in record.items() if k not in ("step", "epoch", "time") and
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


class RunWatchers:
    """Everything that watches a run from rank 0: the progress printer and the configured trackers.

    `relay` (a Ray queue, on Ray Train workers): records and tracker warnings go to the driver, which prints them
    (`driver_progress`); a worker's own output ends in Ray's logs, not in the user's terminal."""

    def __init__(self, cfg: TrackingConfig | None, out_dir: Path, run_id: str, total_steps: int,
                 start_step: int = 0, params: dict | None = None, is_main: bool = True, relay=None):
        cfg = cfg or TrackingConfig()
        self.relay = relay if is_main else None
        self.progress = Progress(cfg.progress if is_main and relay is None else "off", total_steps, start_step)
        self.trackers: list = []
        if not is_main:
            return
        makers = []
        if cfg.tensorboard:
            makers.append(lambda: TensorBoardTracker(out_dir, run_id, params or {}))
        if cfg.mlflow is not None:
            makers.append(lambda: MlflowTracker(cfg.mlflow, out_dir, run_id, params or {}))
        if cfg.wandb is not None:
            makers.append(lambda: WandbTracker(cfg.wandb, out_dir, run_id, params or {}))
        for make in makers:
            try:
                self.trackers.append(make())
            except ConfigError:
                raise
            except Exception as e:  # a tracking server down at start: train anyway
                self._warn(f"tracking: could not start a tracker ({type(e).__name__}: {e}); training continues "
                           "without it")

    def _send(self, item: dict) -> None:
        if self.relay is None:
            return
        try:
            self.relay.put_nowait(item)
        except Exception as e:  # the driver's queue is gone: the run goes on, unwatched from there
            self.relay = None
            warnings.warn(f"progress: the driver stopped listening ({type(e).__name__}: {str(e)[:200]})",
                          stacklevel=2)

    def _warn(self, message: str) -> None:
        warnings.warn(message, stacklevel=3)
        self._send({"warning": message})

    def _each(self, fn_name: str, *args) -> None:
        for t in list(self.trackers):
            try:
                getattr(t, fn_name)(*args)
            except Exception as e:
                self.trackers.remove(t)
                self._warn(f"tracking: {t.name} failed ({type(e).__name__}: {str(e)[:200]}); it is switched off "
                           "for the rest of this run, training continues")

    def write(self, record: dict) -> None:
        self.progress.write(record)
        self._send(record)
        scalars = _scalars(record)
        if scalars and record.get("step") is not None:
            self._each("log", scalars, int(record["step"]))

    def artifacts(self, path: Path) -> None:
        if path.exists():
            self._each("artifacts", path)

    def close(self) -> None:
        self.progress.close()
        self._each("close")
