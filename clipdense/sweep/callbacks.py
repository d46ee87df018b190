"""A sweep's Ray Tune callbacks, on the driver: its progress in the terminal (one line per trial result) and
Tune's own logger callbacks for the sweep's trackers (`tune_callbacks`).

The trials print nothing themselves (their finetunes run with `tracking.progress: off`, often on Ray Train workers
whose output stays in Ray's logs); Tune brings every result they report to the driver, where this callback shows
it through the same `Progress` as pretrain and finetune, prefixed with the trial's directory name.
"""
from __future__ import annotations

import os
from pathlib import Path

from ray.tune import Callback

from clipdense.sweep.grid import hparam_label, plain_hparams
from clipdense.train.tracking import Progress, TrackingConfig, check_installed, require

HP_TOTAL_STEPS = "train.schedule.total_steps"


class TrialProgress(Callback):
    """`tracking.progress` of the sweep (off | lines | bar | auto); `total_steps`: trial name -> its step count."""

    def __init__(self, mode: str, total_steps: dict[str, int]):
        self.mode, self.total_steps = mode, total_steps
        self._shown: dict[str, tuple[Progress, dict]] = {}

    def __getstate__(self) -> dict:  # Tune pickles its callbacks with the experiment; open bars and streams stay
        return {**self.__dict__, "_shown": {}}

    def _progress(self, trial, result: dict) -> Progress:
        config = trial.config or {}
        hp = plain_hparams(config.get("hp"))
        name = config.get("trial", trial.trial_id)
        total = int(hp.get(HP_TOTAL_STEPS, self.total_steps.get(name, 0)))
        label = name + (f"/{hparam_label(hp)}" if hp else "")
        step = result.get("step")
        return Progress(self.mode, total, start_step=int(step or 0), prefix=f"{label}  ")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.mode == "off":
            return
        progress, last = self._shown.get(trial.trial_id) or (self._progress(trial, result), {})
        seen = {k: v for k, v in result.items() if k in ("step", "loss") or k.startswith("eval/")}
        if seen != last:  # a trial's closing report repeats its last one
            progress.write(result)
        self._shown[trial.trial_id] = (progress, seen)

    def on_trial_complete(self, iteration, trials, trial, **info):
        shown = self._shown.pop(trial.trial_id, None)
        if shown is not None:
            shown[0].close()

    on_trial_error = on_trial_complete


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
        if cfg.wandb.mode in ("offline", "disabled"):
            # Ray's callback asks for an API key unless the WANDB_MODE variable (not its `mode`) says offline
            os.environ["WANDB_MODE"] = cfg.wandb.mode
        where = {}
        if out_dir is not None:
            (Path(out_dir) / "wandb").mkdir(parents=True, exist_ok=True)
            where = {"dir": str(Path(out_dir).absolute())}
        callbacks.append(wandb_logger_callback(project=cfg.wandb.project, mode=cfg.wandb.mode,
                                               entity=cfg.wandb.entity, log_config=True, **where))
    return callbacks


def wandb_logger_callback(**kwargs):
    """Ray Tune's WandbLoggerCallback whose per-trial logging actor ends only once W&B has written its run out.
    Ray kills that actor as soon as its `run()` returns, and W&B's service process, which writes the run's records
    and exits with the actor, may not have written the last ones by then: a trial stopped by ASHA right after its
    first result lost its history and its exit record that way (seen once in a loaded CI run)."""
    from ray.air.integrations.wandb import WandbLoggerCallback, _WandbLoggingActor

    class FlushedLoggingActor(_WandbLoggingActor):
        def run(self):
            super().run()
            self._wandb.teardown()  # waits for the service to finish the run's records, then stops it

    class FlushedWandbLoggerCallback(WandbLoggerCallback):
        _logger_actor_cls = FlushedLoggingActor

    return FlushedWandbLoggerCallback(**kwargs)
