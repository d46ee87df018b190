"""`run(cfg)`: one dense finetune through the one training runner, in-process or on Ray Train workers."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from clipdense.config import RayConfig, raise_user_error_behind
from clipdense.dense.base_config import FinetuneBase
from clipdense.dense.task import DenseTaskFactory, resolve_finetune
from clipdense.ray_session import ray_session
from clipdense.train.config import TrainConfig
from clipdense.train.runner import fit, fit_local
from clipdense.train.tracking import TrackingConfig


def absolute_paths(cfg: FinetuneBase) -> FinetuneBase:
    """Ray workers run in other directories: make data.root, save_predictions, out_dir and a local checkpoint
    absolute."""
    data = cfg.data.model_copy(update={"root": str(Path(cfg.data.root).absolute())})
    update = {"data": data, "out_dir": str(Path(cfg.out_dir).absolute())}
    if cfg.save_predictions:
        update["save_predictions"] = str(Path(cfg.save_predictions).absolute())
    ckpt = cfg.backbone.checkpoint
    if ckpt and Path(ckpt).exists():
        update["backbone"] = cfg.backbone.model_copy(update={"checkpoint": str(Path(ckpt).absolute())})
    return cfg.model_copy(update=update)


def run(cfg: FinetuneBase, *, ray_callbacks: list | None = None, name: str | None = None) -> dict:
    """Finetune and evaluate; writes `out_dir/metrics.json` and returns {"out_dir", "metrics", "metrics_json"}.

    Runs in this process when `ray.in_process` is true, or null with one worker (`train.scaling.num_workers`)
    and no `ray_callbacks` (e.g. a sweep trial's `sweep.tune.train_reports_to_tune`); else as a Ray Train job.
    A rerun with the same out_dir resumes from its last checkpoint."""
    cfg = absolute_paths(cfg)
    out = Path(cfg.out_dir)
    factory = resolve_finetune(cfg)  # datasets read and backbone resolved once, here: bad ones fail fast
    in_process = cfg.ray.in_process
    if in_process is None:
        in_process = cfg.train.scaling.num_workers == 1 and not ray_callbacks
    train_cfg = cfg.train.model_copy(update={"out_dir": str(out)})
    watch = Watching(cfg.tracking, cfg.model_dump(mode="json"))
    ray_run = None if in_process else RayRun(cfg.ray, ray_callbacks, name)
    summary = train(factory, train_cfg, watch, ray_run)
    return record_training(out, summary)


@dataclass(frozen=True)
class Watching:
    """How the run is shown (progress, trackers) and the resolved config the trackers record."""

    tracking: TrackingConfig
    params: dict


@dataclass(frozen=True)
class RayRun:
    """Where a Ray Train run goes: the cluster, the Ray Train callbacks (a sweep trial's), the run name."""

    ray: RayConfig
    callbacks: list | None
    name: str | None


def train(factory: DenseTaskFactory, train_cfg: TrainConfig, watch: Watching, ray_run: RayRun | None) -> dict:
    """The runner's summary: in this process (`ray_run` None) or on Ray Train workers; a user error from a worker
    comes back as its one line."""
    try:
        if ray_run is None:
            return fit_local(factory, train_cfg, tracking=watch.tracking, params=watch.params)
        with ray_session(ray_run.ray):
            return fit(factory, train_cfg, callbacks=ray_run.callbacks, name=ray_run.name, tracking=watch.tracking,
                       params=watch.params)
    except Exception as e:
        raise_user_error_behind(e)
        raise


def record_training(out: Path, summary: dict) -> dict:
    """Add the runner's view (final train loss, throughput, steps) to the metrics.json rank 0 wrote; the result."""
    path = out / "metrics.json"
    metrics = summary.get("metrics", {})
    if path.is_file():
        record = json.loads(path.read_text())
        record["train"] = {"steps": summary.get("step"), "epochs": summary.get("epoch"),
                           "restored_from_steps": summary.get("restored_from_steps", []),
                           **{k: v for k, v in metrics.items() if not k.startswith("eval/")}}
        path.write_text(json.dumps(record, indent=2))
    return {"out_dir": str(out), "metrics": metrics, "metrics_json": str(path) if path.is_file() else None,
            "stopped_early": summary.get("stopped_early", False)}
