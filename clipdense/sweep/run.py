"""`clipdense sweep` entry: expand the grid once, record it (with its provenance) beside the trials, run it (protocol
finetune: on Ray Tune, a trial per fit; protocol fit: a job per (backbone, task)), then report."""
from __future__ import annotations

import json
from pathlib import Path

from clipdense.config import run_provenance
from clipdense.sweep.config import SweepConfig
from clipdense.sweep.grid import Trial, expand, grid_hash
from clipdense.sweep.report import SWEEP_FILE, ReportConfig
from clipdense.sweep.report import run as write_report
from clipdense.sweep.tune import run_fit, run_tune


def run(cfg: SweepConfig) -> dict:
    """Run (or resume) the sweep in `cfg.out`, then write the report there. Returns a small summary."""
    trials = expand(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    grid = grid_hash(trials, cfg)
    config = cfg.model_dump(mode="json")
    provenance = run_provenance(config)
    _record(out / SWEEP_FILE, {**config, "provenance": provenance}, grid, trials)
    if cfg.protocol == "fit":
        summary = run_fit(cfg, trials, provenance["config_hash"])
    else:
        experiment = f"{cfg.name}-{grid}"     # a changed grid is a new Tune experiment; the same one is restored
        summary = run_tune(cfg, trials, experiment, cfg.tune_state())
    summary["provenance"] = provenance
    _print_summary(cfg.name, summary, out)
    if cfg.run_report:
        summary["report"] = write_report(ReportConfig(results_dir=str(out), **cfg.report.model_dump()))
    return summary


def _record(path: Path, config: dict, grid: str, trials: list[Trial]) -> None:
    """sweep.json: the resolved config, the grid's hash and the trial names (the report reads it)."""
    path.write_text(json.dumps({**config, "grid_hash": grid, "trial_names": [t.name for t in trials]}, indent=2))


def _print_summary(name: str, summary: dict, out: Path) -> None:
    protocol = summary.get("protocol", "finetune")
    print(f"sweep {name} ({protocol}): {summary['trials']} trials, {summary['skipped']} already done, "
          f"{len(summary['failed'])} failed, {len(summary['stopped'])} stopped early -> {out}")
    for line in summary["failed"]:
        print(f"  FAILED {line}")
