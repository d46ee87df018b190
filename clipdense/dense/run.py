"""`run(cfg)`: one dense finetune through the one training runner, in-process or on Ray Train workers."""
from __future__ import annotations

import json
from pathlib import Path

from clipdense.config import UserError
from clipdense.dense.config import FinetuneConfig
from clipdense.dense.datasets import build_eval_dataset, build_train_dataset
from clipdense.dense.task import DenseTaskFactory
from clipdense.ray_session import ray_session


def find_user_error(exc: BaseException) -> UserError | None:
    """The UserError behind an exception, looking through Ray's wrappers (worker failures, task errors, causes)."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)
        if isinstance(cause, UserError):
            return cause
        if isinstance(e, UserError) and type(e).__module__.startswith("clipdense"):
            return e
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            todo.extend(failures.values())
        todo.extend(x for x in (cause, e.__cause__, e.__context__) if isinstance(x, BaseException))
    return None


def absolute_paths(cfg: FinetuneConfig) -> FinetuneConfig:
    """Ray workers run in other directories: make data.root, save_predictions, out_dir and a local checkpoint absolute."""
    data = cfg.data.model_copy(update={"root": str(Path(cfg.data.root).absolute())})
    update = {"data": data, "out_dir": str(Path(cfg.out_dir).absolute())}
    if cfg.save_predictions:
        update["save_predictions"] = str(Path(cfg.save_predictions).absolute())
    ckpt = cfg.backbone.checkpoint
    if ckpt and Path(ckpt).exists():
        update["backbone"] = cfg.backbone.model_copy(update={"checkpoint": str(Path(ckpt).absolute())})
    return cfg.model_copy(update=update)


def run(cfg: FinetuneConfig, *, ray_callbacks: list | None = None, name: str | None = None) -> dict:
    """Finetune and evaluate; writes `out_dir/metrics.json` and returns {"out_dir", "metrics", "metrics_json"}.

    Runs in this process when `ray.in_process` is true, or null with one worker (`train.scaling.num_workers`)
    and no `ray_callbacks` (e.g. a sweep trial's `sweep.tune.train_reports_to_tune`); else as a Ray Train job.
    A rerun with the same out_dir resumes from its last checkpoint."""
    from clipdense.train import fit, fit_local

    cfg = absolute_paths(cfg)
    out = Path(cfg.out_dir)
    # Read both datasets once here so a bad path or annotation file fails fast with its one-line error.
    build_train_dataset(cfg)
    build_eval_dataset(cfg)
    train_cfg = cfg.train.model_copy(update={"out_dir": str(out)})
    factory = DenseTaskFactory(cfg.model_dump(mode="json"))
    in_process = cfg.ray.in_process
    if in_process is None:
        in_process = cfg.train.scaling.num_workers == 1 and not ray_callbacks
    try:
        if in_process:
            summary = fit_local(factory, train_cfg, tracking=cfg.tracking, params=cfg.model_dump(mode="json"))
        else:
            with ray_session(cfg.ray):
                summary = fit(factory, train_cfg, callbacks=ray_callbacks, name=name, tracking=cfg.tracking,
                              params=cfg.model_dump(mode="json"))
    except Exception as e:
        user = find_user_error(e)
        if user is not None and user is not e:
            raise type(user)(str(user).strip().splitlines()[0]) from None
        raise
    path = out / "metrics.json"
    metrics = summary.get("metrics", {})
    if path.is_file():  # rank 0 wrote it; add the runner's view (final train loss, throughput, steps)
        record = json.loads(path.read_text())
        record["train"] = {"steps": summary.get("step"), "epochs": summary.get("epoch"),
                           "restored_from_steps": summary.get("restored_from_steps", []),
                           **{k: v for k, v in metrics.items() if not k.startswith("eval/")}}
        path.write_text(json.dumps(record, indent=2))
    return {"out_dir": str(out), "metrics": metrics, "metrics_json": str(path) if path.is_file() else None,
            "stopped_early": summary.get("stopped_early", False)}
