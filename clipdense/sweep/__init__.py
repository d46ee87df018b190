"""`clipdense sweep`: data-efficiency and hyperparameter sweeps of dense finetunes on Ray Tune, then the report.

    grid.py    SweepConfig -> trials (task x backbone x fraction x seed), deterministic trial dir names
    tune.py    Ray Tune wiring: one trial = one `clipdense.dense.run`, resources, retries, restore
    factor.py  data-efficiency factor: monotone fits, paired seed bootstrap, censoring (pure numpy)
    report.py  `clipdense report DIR`: plots, tables, factors from the trial dirs' metrics.json
    progress.py  a Tune callback printing one progress line per trial result on the driver
"""
from __future__ import annotations

import json
from pathlib import Path

from clipdense.sweep.config import SweepConfig
from clipdense.sweep.grid import Trial, expand, grid_hash
from clipdense.sweep.report import SWEEP_FILE, ReportConfig

__all__ = ["ReportConfig", "SweepConfig", "Trial", "expand", "run"]


def run(cfg: SweepConfig) -> dict:
    """Run (or resume) the sweep in `cfg.out`, then write the report there. Returns a small summary."""
    from clipdense.sweep import report
    from clipdense.sweep.tune import run_tune

    trials = expand(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / SWEEP_FILE).write_text(json.dumps({**cfg.model_dump(mode="json"), "grid_hash": grid_hash(trials, cfg),
                                              "trial_names": [t.name for t in trials]}, indent=2))
    summary = run_tune(cfg, trials)
    print(f"sweep {cfg.name}: {summary['trials']} trials, {summary['skipped']} already done, "
          f"{len(summary['failed'])} failed, {len(summary['stopped'])} stopped early -> {out}")
    for line in summary["failed"]:
        print(f"  FAILED {line}")
    if cfg.run_report:
        summary["report"] = report.run(ReportConfig(results_dir=str(out), **cfg.report.model_dump()))
    return summary
