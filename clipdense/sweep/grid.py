"""Expand a SweepConfig into trials: one finetune config (as a dict) per (task, backbone, fraction, seed).

No Ray, no torch of its own (only the finetune config schemas, to route backbone overrides to the tasks that have
the key): the driver validates each dict against `FinetuneConfig` before launching anything.
Trial names are deterministic, `seg/recap-clip/f0.0625/s1`, so reruns find earlier results by path.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipdense.config import ConfigError, configs_dir, deep_merge, get_dotted, read_yaml, set_dotted
from clipdense.dense.config import FinetuneConfig, has_key
from clipdense.sweep.config import SweepConfig

METRICS_FILE = "metrics.json"
TRIAL_FILE = "trial.json"     # the trial's coordinates, written before the finetune starts


def fraction_label(fraction: float) -> str:
    return "f" + format(float(fraction), ".6g")


def default_fractions(min_fraction: float) -> list[float]:
    """Powers of two from 1 down to `min_fraction` (inclusive when it is one), ascending."""
    n = math.floor(math.log2(1.0 / min_fraction) + 1e-9)
    return [2.0 ** -k for k in range(n, -1, -1)]


def fractions(cfg: SweepConfig) -> list[float]:
    return sorted(float(f) for f in (cfg.fractions or default_fractions(cfg.min_fraction)))


def seeds_for(cfg: SweepConfig, fraction: float) -> list[int]:
    n = cfg.seeds
    extra = cfg.small_fraction_seeds
    if extra is not None and fraction < extra.below:
        n = max(n, extra.seeds)
    return list(range(n))


def flat_metrics(doc: dict, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a metrics dict (a `metrics.json`, or a finetune's results), nested keys joined with
    '/'; the config, backbone and provenance sections are no metrics and are skipped."""
    out = {}
    for k, v in doc.items():
        if isinstance(v, dict) and k not in ("config", "backbone", "provenance"):
            out.update(flat_metrics(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[f"{prefix}{k}"] = float(v)
    return out


def plain_hparams(hparams: dict[str, Any] | None) -> dict[str, Any]:
    """Sampled hyperparameters as plain Python values (Tune hands numpy scalars)."""
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in (hparams or {}).items()}


def hparam_label(hparams: dict[str, Any]) -> str:
    """A short stable directory name for one hyperparameter sample."""
    text = json.dumps(hparams, sort_keys=True, default=str)
    return "hp-" + hashlib.sha1(text.encode()).hexdigest()[:10]


def scale_schedule(data: dict, keys, fraction: float) -> None:
    """schedule_by epochs: the fraction's steps (and warmup) are the full-data ones times the fraction."""
    for key in (keys.total_steps, keys.warmup_steps):
        steps = get_dotted(data, key)
        if isinstance(steps, int) and steps > 0:
            set_dotted(data, key, max(1, round(steps * fraction)))


def resolve_config_path(path: str) -> Path:
    """A finetune YAML given relative to the cwd, or to the shipped tree (`configs/finetune/x.yaml`)."""
    p = Path(path)
    if p.is_file():
        return p.resolve()
    shipped = configs_dir().parent / p
    if not p.is_absolute() and shipped.is_file():
        return shipped.resolve()
    raise ConfigError(f"finetune config not found: {path}")


@dataclass(frozen=True)
class Trial:
    task: str
    backbone: str
    fraction: float
    seed: int
    metric: str                       # metric key in metrics.json the report plots
    mode: str                         # "max" | "min"
    source: str                       # base finetune YAML, for error messages
    finetune: dict = field(repr=False, hash=False, compare=False)   # finetune config data, out_dir unset
    condition: str = ""               # pretraining condition (the backbone's name unless grouped)
    schedule_by: str = "iterations"
    total_steps: int | None = None    # the trial's finetuning steps (scaled by the fraction with schedule_by epochs)

    @property
    def name(self) -> str:
        return f"{self.task}/{self.backbone}/{fraction_label(self.fraction)}/s{self.seed}"

    def coordinates(self) -> dict:
        return {"task": self.task, "backbone": self.backbone, "fraction": self.fraction, "seed": self.seed,
                "metric": self.metric, "mode": self.mode, "condition": self.condition or self.backbone,
                "schedule_by": self.schedule_by, "total_steps": self.total_steps}


def trial_dir(out: str | Path, name: str) -> Path:
    return Path(out) / "trials" / name


def expand(cfg: SweepConfig) -> list[Trial]:
    """All trials, ordered task, backbone, fraction (ascending), seed. A backbone's `overrides` apply to the tasks
    whose config has the key (SweepConfig refuses a key of no task's config)."""
    trials = []
    keys = cfg.keys
    for task in cfg.tasks:
        path = resolve_config_path(task.config)
        base = read_yaml(path)
        for k, v in task.overrides.items():
            set_dotted(base, k, v)
        for bb in cfg.backbones:
            data = copy.deepcopy(base)
            if bb.backbone:
                section = data.get(keys.backbone)
                data[keys.backbone] = deep_merge(section if isinstance(section, dict) else {}, bb.backbone)
            for k, v in bb.overrides.items():
                if has_key(FinetuneConfig.TASKS.get(data.get("task", "seg"), FinetuneConfig), k):
                    set_dotted(data, k, v)
            for f in fractions(cfg):
                for s in seeds_for(cfg, f):
                    d = copy.deepcopy(data)
                    set_dotted(d, keys.fraction, f)
                    if cfg.schedule_by == "epochs":
                        scale_schedule(d, keys, f)
                    for key in keys.seed:
                        set_dotted(d, key, s)
                    trials.append(Trial(task.name, bb.name, f, s, task.metric, task.mode, str(path), d,
                                        bb.condition_name, cfg.schedule_by, get_dotted(d, keys.total_steps)))
    return trials


def grid_hash(trials: list[Trial], cfg: SweepConfig) -> str:
    """Identifies a grid (trial set + search space): Tune state is restored only for the same grid."""
    payload = {"trials": [[t.name, t.finetune] for t in trials],
               "search": {k: v.model_dump() for k, v in cfg.search_space.items()},
               "num_samples": cfg.num_samples, "search_seed": cfg.search_seed,
               "scheduler": cfg.scheduler.model_dump()}
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:8]
