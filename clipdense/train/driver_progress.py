"""The driver's side of watching a run on Ray: a Ray Train run's progress in the user's terminal, and a sweep's
Ray Tune logger callbacks (`tune_callbacks`).

A worker's stdout ends in Ray's worker logs (a local Ray runs with `log_to_driver=False`), and Ray Train's
`UserCallback.after_report` runs in its controller actor, not in the driver: neither reaches the terminal. So the
driver makes a Ray queue (a zero-CPU actor), rank 0's `RunWatchers` puts every record and tracker warning in it,
and a thread here prints them through `Progress` (a tqdm bar when the driver's stdout is a TTY).
This is the Ray half of watching a run; train/tracking stays free of Ray.
"""
from __future__ import annotations

import contextlib
import os
import threading
import warnings
from pathlib import Path
from typing import Any, Iterator

from clipdense.train.tracking import Progress, TrackingConfig, check_installed, require


@contextlib.contextmanager
def driver_progress(tracking: TrackingConfig | None, total_steps: int) -> Iterator[Any]:
    """Yields the queue rank 0 relays to (None when `tracking.progress` is off); prints what arrives until the
    block ends, then what is still queued."""
    mode = (tracking or TrackingConfig()).progress
    if mode == "off":
        yield None
        return
    from ray.util.queue import Empty, Queue

    queue = Queue(actor_options={"num_cpus": 0})  # a full cluster must not keep the mailbox from starting
    progress = Progress(mode, total_steps)
    done = threading.Event()

    def pump() -> None:
        while True:
            try:
                item = queue.get(timeout=0.5)
            except Empty:
                if done.is_set():
                    return
                continue
            except Exception:  # Ray went away under us: nothing more will arrive
                return
            if "warning" in item:
                warnings.warn(item["warning"], stacklevel=1)
            else:
                progress.write(item)

    thread = threading.Thread(target=pump, name="clipdense-progress", daemon=True)
    thread.start()
    try:
        yield queue
    finally:
        done.set()
        thread.join(timeout=30)
        progress.close()
        with contextlib.suppress(Exception):
            queue.shutdown()


def tune_callbacks(cfg: TrackingConfig | None, out_dir: Path | None = None) -> list:
    """Ray Tune's own logger callbacks for a sweep: each trial is logged once, by Tune, with its config and the
    metrics it reports (the trials themselves then track nothing). TensorBoard: Tune writes event files for every
    trial by itself when tensorboardX is installed (part of the `tracking` extra). W&B's local run folders go to
    `<out_dir>/wandb` (one `offline-run-*` per trial, for `wandb sync`), as for pretrain and finetune: left to Ray,
    they sit in its staging folder, and the copy it syncs to storage can be taken before W&B has finished."""
    if cfg is None:
        return []
    check_installed(cfg)
    callbacks = []
    if cfg.tensorboard:
        require("tensorboardX", "tracking.tensorboard (sweeps)")
    if cfg.mlflow is not None:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        # check_installed opened the store above (file store allowed, short timeouts); the URI is absolute
        callbacks.append(MLflowLoggerCallback(tracking_uri=cfg.mlflow.tracking_uri,
                                              experiment_name=cfg.mlflow.experiment, save_artifact=False))
    if cfg.wandb is not None:
        from ray.air.integrations.wandb import WandbLoggerCallback

        if cfg.wandb.mode in ("offline", "disabled"):
            # Ray's callback asks for an API key unless the WANDB_MODE variable (not its `mode`) says offline
            os.environ["WANDB_MODE"] = cfg.wandb.mode
        where = {}
        if out_dir is not None:
            (Path(out_dir) / "wandb").mkdir(parents=True, exist_ok=True)
            where = {"dir": str(Path(out_dir).absolute())}
        callbacks.append(WandbLoggerCallback(project=cfg.wandb.project, mode=cfg.wandb.mode,
                                             entity=cfg.wandb.entity, log_config=True, **where))
    return callbacks
