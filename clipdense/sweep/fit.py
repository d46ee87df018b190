"""`protocol: fit`: one job per (backbone, task) instead of one Tune trial per fit (no Ray here: sweep/tune.py runs
the jobs as Ray tasks or in this process).

A job builds the first pending trial's finetune config, prepares the fitted probe (`dense.fit_probe.FitProbe`:
features computed once over all train and eval images, cached in `<out>/features/<task>/<backbone>.pt`), then for
each of its trials fits the subset that trial's `data.fraction` and `data.seed` pick, and writes the trial directory
the finetune protocol writes: `trial.json` and `metrics.json` (the task's metrics under "metrics", plus "protocol":
"fit", a "probe" section and "provenance"), so the report and the factor code read them unchanged. Every seed the
grid asks for gets its directory, also at fraction 1, where all seeds share one subset and one fit (zero variance).
A rerun skips the trials whose metrics.json carries this config's hash and fits the others again.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from clipdense.config import UserError, config_hash, run_provenance
from clipdense.dense.base_config import FinetuneBase
from clipdense.dense.fit_probe import FitProbe, FitProbeConfig
from clipdense.dense.fit_probe.job import HEAD
from clipdense.sweep.config import SweepConfig
from clipdense.sweep.grid import METRICS_FILE, TRIAL_FILE, Trial

FEATURES_DIR = "features"
PROVENANCE_EXCLUDE = ("out", "fresh", "out_dir")
RUN_ONLY = ("in_process", "batch_size")     # fit settings that do not change a result


@dataclass(frozen=True)
class FitJob:
    """One (task, backbone): its pending trials (name, coordinates, finetune config) and settings."""

    task: str
    backbone: str
    trials: list[dict]
    out: str
    fit: dict
    sweep_hash: str | None = None
    cwd: str = field(default_factory=lambda: str(Path.cwd()))

    @property
    def features(self) -> Path:
        return Path(self.out) / FEATURES_DIR / self.task / f"{self.backbone}.pt"


def fit_jobs(cfg: SweepConfig, trials: list[Trial], out: Path, sweep_hash: str | None = None) -> list[FitJob]:
    """The jobs of the trials not finished with this config yet (no metrics.json, or one whose config hash differs:
    a changed finetune config or `fit:` section fits again), grouped by (task, backbone) in grid order."""
    fit = cfg.fit.model_dump(mode="json")
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for t in trials:
        item = {"name": t.name, "coords": t.coordinates(), "finetune": t.finetune}
        if not finished(Path(t.finetune.out_dir) / METRICS_FILE, fit_hash(t.finetune, fit)):
            groups[(t.task, t.backbone)].append(item)
    return [FitJob(task, bb, items, str(out), fit, sweep_hash) for (task, bb), items in groups.items()]


def hashed(cfg: FinetuneBase, fit: dict) -> dict:
    """What identifies a fit trial's result: its finetune config and the fit settings but where and how batched
    the jobs ran."""
    return {**cfg.model_dump(mode="json"), "fit": {k: v for k, v in fit.items() if k not in RUN_ONLY}}


def fit_hash(cfg: FinetuneBase, fit: dict) -> str:
    """provenance.config_hash of a fit trial's metrics.json."""
    return config_hash(hashed(cfg, fit), PROVENANCE_EXCLUDE)


def finished(path: Path, expected_hash: str) -> bool:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and (doc.get("provenance") or {}).get("config_hash") == expected_hash


def run_fit_job(job: FitJob) -> dict:
    """{"done": [names], "failed": ["name: one line", ...]}: a job's failure fails its trials, with its cause."""
    done: list[str] = []
    try:
        fit = FitProbeConfig.model_validate(job.fit)
        probe = FitProbe(job.trials[0]["finetune"], fit, job.features)
        for trial in job.trials:
            write_trial(job, trial, probe)
            done.append(trial["name"])
    except Exception as e:  # reported per trial, as Tune reports a failed trial; the other jobs go on
        line = str(e).strip().splitlines()[-1] if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
        return {"done": done, "failed": [f"{t['name']}: {line[:200]}" for t in job.trials if t["name"] not in done]}
    return {"done": done, "failed": []}


def write_trial(job: FitJob, trial: dict, probe: FitProbe) -> None:
    cfg = trial["finetune"]
    result = probe.run(cfg.data.fraction, cfg.data.seed)
    tdir = Path(cfg.out_dir)
    tdir.mkdir(parents=True, exist_ok=True)
    (tdir / TRIAL_FILE).write_text(json.dumps({**trial["coords"], "hp": None, "hparams": {}, "name": trial["name"],
                                               "protocol": "fit"}, indent=2))
    record = {"task": cfg.task, "head": HEAD, "protocol": "fit", "metrics": result["metrics"],
              "backbone": probe.backbone, "data": result["data"], "probe": {**result["probe"], "settings": job.fit},
              "config": cfg.model_dump(mode="json"),
              "provenance": {**run_provenance(hashed(cfg, job.fit), PROVENANCE_EXCLUDE),
                             "sweep_config_hash": job.sweep_hash}}
    tmp = tdir / (METRICS_FILE + ".tmp")
    tmp.write_text(json.dumps(finite(record), indent=2, default=str))
    tmp.replace(tdir / METRICS_FILE)     # metrics.json marks a finished trial: never half written


def finite(v):
    """NaN and inf (a class absent everywhere, no atypical pixel) as null: metrics.json stays strict JSON."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [finite(x) for x in v]
    return v
