"""`run(cfg)`: the pretrain stage's entry. It resolves everything once: the model with its preprocessing and loss kind
(pretrain/model.py), the zero-shot set, where the rows come from (`Storage` values); then it builds the datasets
(Ray Data, or read in this process: `data.loader`), trains with the one runner (`clipdense.train`) and returns a
small summary."""
from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path

from clipdense.config import run_provenance
from clipdense.data.paths import expand_shards
from clipdense.eval.zeroshot import resolve_zeroshot
from clipdense.pretrain.config import DataConfig, EvalConfig, PretrainConfig
from clipdense.pretrain.data import Sources, build_datasets
from clipdense.pretrain.local_data import build_local_datasets
from clipdense.pretrain.model import build_model
from clipdense.pretrain.task import ClipPretrainTask
from clipdense.ray_session import data_context, ray_session
from clipdense.train.runner import TrainPlan, run_training


def row_sources(data: DataConfig, ev: EvalConfig, policy: str,
                min_score: float | None = None) -> tuple[Sources, Sources | None]:
    """(the training rows' sources, those of the held-out `eval.path` or None), all reached through the `data:`
    section's endpoint, their shards listed once; `min_score` (captions.min_score) filters the training rows'
    synthetic captions (no effect under `real`; held-out rows are evaluated on their first synthetic caption)."""
    def shards(spec: str | list[str]):
        return expand_shards([data.storage(s) for s in ([spec] if isinstance(spec, str) else spec)])

    def recaptions(uri: str | None):
        return data.storage(uri) if uri else None

    train_rows = Sources(shards(data.shards), recaptions(data.recaptions), policy,
                         min_score if policy != "real" else None)
    if not ev.path:
        return train_rows, None
    held_out = Sources(shards(ev.path), recaptions(ev.recaptions), "real" if ev.caption == "real" else "synthetic")
    return train_rows, held_out


@contextlib.contextmanager
def _data_scope(cfg: PretrainConfig, on_ray: bool):
    """Ray (joined or started) and Ray Data's settings for a run that reads through Ray Data; nothing for one that
    reads locally (data.loader: it needs no Ray at all)."""
    if not on_ray:
        yield
        return
    quiet = {"enable_progress_bars": cfg.tracking.ray_data_progress}  # Ray Data's bars would drown ours
    with ray_session(cfg.ray), data_context(quiet):
        yield


def run(cfg: PretrainConfig) -> dict:
    train_rows, held_out = row_sources(cfg.data, cfg.eval, cfg.captions.policy, cfg.captions.min_score)
    model = build_model(cfg.model, cfg.loss, cfg.train.seed)
    # a bad folder or prompt file is a one-line error before any worker starts
    zeroshot = resolve_zeroshot(cfg.eval.zeroshot, "eval.zeroshot") if cfg.eval.zeroshot.root else None
    task = functools.partial(ClipPretrainTask, cfg, model, zeroshot)
    build = build_local_datasets if cfg.reads_locally() else build_datasets
    with _data_scope(cfg, build is build_datasets):
        train_ds, eval_ds, counts = build(train_rows, held_out, cfg.data, cfg.eval, model.preprocess.size,
                                          cfg.loss.distill.enabled)
        datasets = {"train": train_ds, **({"eval": eval_ds} if eval_ds is not None else {})}
        # elastic: no split by worker count; each worker slices global batches by sample index (task.py)
        plan = TrainPlan(in_process=bool(cfg.ray.in_process), datasets=datasets, tracking=cfg.tracking,
                         params=cfg.model_dump(mode="json"),  # what the trackers record
                         ordered_split=() if cfg.train.scaling.elastic else ("train",))
        result = run_training(task, cfg.train, plan)
    summary = {"model": cfg.model.name, "policy": cfg.captions.policy, **model.params, "data": counts, **result,
               "provenance": run_provenance(plan.params)}
    out = Path(cfg.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pretrain_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "config.yaml").write_text(cfg.to_yaml())
    return summary
