"""`clipdense sweep`: data-efficiency and hyperparameter sweeps of dense finetunes on Ray Tune, then the report.

    run.py     the entry: expand the grid once, record it (sweep.json), run it on Tune, then the report
    grid.py    SweepConfig -> trials (task x backbone x fraction x seed), deterministic trial dir names
    tune.py    Ray Tune wiring: one trial = one dense finetune, resources, retries, restore
    factor.py  data-efficiency factor: monotone fits, paired seed bootstrap, censoring (pure numpy)
    report.py  `clipdense report DIR`: plots, tables, factors from the trial dirs' metrics.json
    callbacks.py the driver's Tune callbacks: one progress line per trial result, the trackers' logger callbacks
"""
from __future__ import annotations

from clipdense.sweep.config import SweepConfig
from clipdense.sweep.grid import Trial, expand
from clipdense.sweep.report import ReportConfig
from clipdense.sweep.run import run

__all__ = ["ReportConfig", "SweepConfig", "Trial", "expand", "run"]
