"""Expand a SweepConfig into trials: one typed finetune config per (task, backbone, fraction, seed).

No Ray, no torch of its own (only the finetune config schemas). Each (task, backbone) config is built from its YAML
and overrides and validated once, here on the driver; a trial's coordinates (fraction, seeds, scaled schedule, its
directory) are typed edits of it, each value validated as it is set. Trials carry the config objects to Tune.
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

from clipdense.config import ConfigError, build_config, configs_dir, deep_merge, read_yaml, set_dotted, with_values
from clipdense.dense.base_config import FinetuneBase
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


def coordinates_set(cfg: FinetuneBase, fraction: float, seed: int, out_dir: Path, by_epochs: bool,
                    source: str) -> FinetuneBase:
    """The grid config at one (fraction, seed): its data subset, its init and subset seeds (same seed -> nested
    subsets), its directory, and with schedule_by epochs its steps (and warmup) times the fraction."""
    values: dict = {"data.fraction": fraction, "data.seed": seed, "train.seed": seed, "out_dir": str(out_dir)}
    if by_epochs:
        schedule = cfg.train.schedule
        values["train.schedule.total_steps"] = max(1, round(schedule.total_steps * fraction))
        if schedule.warmup_steps > 0:
            values["train.schedule.warmup_steps"] = max(1, round(schedule.warmup_steps * fraction))
    return with_values(cfg, values, source)


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
    finetune: FinetuneBase = field(repr=False, hash=False, compare=False)   # validated; out_dir = the trial's dir
    condition: str = ""               # pretraining condition (the backbone's name unless grouped)
    schedule_by: str = "iterations"

    @property
    def total_steps(self) -> int:
        """The trial's finetuning steps (scaled by the fraction with schedule_by epochs)."""
        return self.finetune.train.schedule.total_steps

    @staticmethod
    def name_of(task: str, backbone: str, fraction: float, seed: int) -> str:
        return f"{task}/{backbone}/{fraction_label(fraction)}/s{seed}"

    @property
    def name(self) -> str:
        return self.name_of(self.task, self.backbone, self.fraction, self.seed)

    def coordinates(self) -> dict:
        return {"task": self.task, "backbone": self.backbone, "fraction": self.fraction, "seed": self.seed,
                "metric": self.metric, "mode": self.mode, "condition": self.condition or self.backbone,
                "schedule_by": self.schedule_by, "total_steps": self.total_steps}


def trial_dir(out: str | Path, name: str) -> Path:
    return Path(out) / "trials" / name


def expand(cfg: SweepConfig) -> list[Trial]:
    """All trials, ordered task, backbone, fraction (ascending), seed, each with its validated finetune config
    (out_dir: its directory under the sweep's `out`). A backbone's `overrides` apply to the tasks whose config has
    the key (SweepConfig refuses a key of no task's config)."""
    trials = []
    out = Path(cfg.out).absolute()
    for task in cfg.tasks:
        path = resolve_config_path(task.config)
        base = read_yaml(path)
        for k, v in task.overrides.items():
            set_dotted(base, k, v)
        for bb in cfg.backbones:
            data = copy.deepcopy(base)
            if bb.backbone:
                section = data.get("backbone")
                data["backbone"] = deep_merge(section if isinstance(section, dict) else {}, bb.backbone)
            for k, v in bb.overrides.items():
                if has_key(FinetuneConfig.TASKS.get(data.get("task", "seg"), FinetuneConfig), k):
                    set_dotted(data, k, v)
            source = f"{path} (task {task.name}, backbone {bb.name})"
            grid_cfg = build_config(FinetuneConfig, data, source)
            for f in fractions(cfg):
                for s in seeds_for(cfg, f):
                    name = Trial.name_of(task.name, bb.name, f, s)
                    ft = coordinates_set(grid_cfg, f, s, trial_dir(out, name), cfg.schedule_by == "epochs",
                                         f"{source} (trial {name})")
                    trials.append(Trial(task.name, bb.name, f, s, task.metric, task.mode, str(path), ft,
                                        bb.condition_name, cfg.schedule_by))
    return trials


def grid_hash(trials: list[Trial], cfg: SweepConfig) -> str:
    """Identifies a grid (trial set + search space): Tune state is restored only for the same grid."""
    payload = {"trials": [[t.name, t.finetune.model_dump(mode="json", exclude={"out_dir"})] for t in trials],
               "search": {k: v.model_dump() for k, v in cfg.search_space.items()},
               "num_samples": cfg.num_samples, "search_seed": cfg.search_seed,
               "scheduler": cfg.scheduler.model_dump()}
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:8]
