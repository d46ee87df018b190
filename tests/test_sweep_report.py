"""The report on a directory of hand-written metrics.json files: tables, plots, factors, unreadable trials, CLI."""
import csv
import json
import math

import numpy as np
import pytest
from PIL import Image

from clipdense.cli import main as cli_main
from clipdense.sweep.report import ReportConfig, find_metric, run

SEG = {  # backbone -> fraction -> per-seed mIoU
    "alt": {0.25: [0.20, 0.24, 0.22], 0.5: [0.30, 0.32], 1.0: [0.40, 0.44, 0.42]},
    "recap": {0.25: [0.36, 0.40, 0.38], 0.5: [0.46, 0.48], 1.0: [0.55, 0.57, 0.56]},
}
DEPTH = {  # RMSE, lower is better; recap reaches alt's full-data 0.50 between 1/4 (0.6) and 1/2 (0.4)
    "alt": {0.25: [0.9], 0.5: [0.7], 1.0: [0.5, 0.5]},
    "recap": {0.25: [0.6], 0.5: [0.4], 1.0: [0.3, 0.3]},
}


def _write(root, task, curves, metric_doc, with_trial_json):
    for bb, curve in curves.items():
        for f, values in curve.items():
            for seed, v in enumerate(values):
                d = root / "trials" / task / bb / f"f{f:.6g}" / f"s{seed}"
                d.mkdir(parents=True)
                (d / "metrics.json").write_text(json.dumps(metric_doc(v)))
                if with_trial_json:
                    (d / "trial.json").write_text(json.dumps({"task": task, "backbone": bb, "fraction": f,
                                                              "seed": seed, "metric": "mIoU", "mode": "max"}))


@pytest.fixture
def results(tmp_path):
    root = tmp_path / "sweep"
    # seg: coordinates from trial.json, metric nested under "metrics"; depth: coordinates from the path only
    _write(root, "seg", SEG, lambda v: {"task": "seg", "metrics": {"mIoU": v, "aAcc": 0.9},
                                        "config": {"mIoU": -1}, "train": {"loss": 1.0}}, True)
    _write(root, "depth", DEPTH, lambda v: {"task": "depth", "metrics": {"rmse": v, "abs_rel": 0.1}}, False)
    bad = root / "trials" / "seg" / "alt" / "f0.125" / "s0"
    bad.mkdir(parents=True)
    (bad / "metrics.json").write_text("{not json")
    (root / "sweep.json").write_text(json.dumps({"report": {"reference": "alt", "bootstrap": 200},
                                                 "trial_names": ["seg/alt/f1/s0", "seg/alt/f0.0625/s0"]}))
    return root


def test_report_tables_plots_and_factors(results, capsys):
    summary = run(ReportConfig(results_dir=str(results)))
    assert summary["trials"] == 2 * 8 + 2 * 4 and summary["unreadable"] == 1
    assert summary["missing"] == 1                                     # in the sweep's grid, no results
    with open(results / "report.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * 3 + 2 * 3
    for task, curves_ in (("seg", SEG), ("depth", DEPTH)):
        for bb, curve in curves_.items():
            for f, values in curve.items():
                row = next(r for r in rows if (r["task"], r["backbone"], float(r["fraction"])) == (task, bb, f))
                assert int(row["n_seeds"]) == len(values)
                assert float(row["mean"]) == pytest.approx(np.mean(values))
                assert float(row["std"]) == pytest.approx(np.std(values, ddof=1) if len(values) > 1 else 0.0)
    for task in ("seg", "depth"):
        png = results / f"{task}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(png) as im:
            im.verify()
            assert im.size[0] > 200
    factors = json.loads((results / "factors.json").read_text())
    seg = factors["seg"]["backbones"]["recap"]
    # alt's full data: 0.42; recap: 0.38 at 1/4, 0.47 at 1/2 -> t = 4/9 of the way in log2 f
    assert factors["seg"]["target"] == pytest.approx(0.42)
    assert seg["fraction"] == pytest.approx(2 ** (-2 + 4 / 9))
    assert seg["ci_low"] <= seg["factor"] <= seg["ci_high"]
    depth = factors["depth"]["backbones"]["recap"]
    assert factors["depth"]["mode"] == "min"
    assert depth["factor"] == pytest.approx(1 / math.sqrt(0.125))
    md = (results / "report.md").read_text()
    assert "## seg: mIoU (higher is better)" in md and "## depth: rmse (lower is better)" in md
    assert "| recap | 0.25 | 3 | 0.3800 | 0.0200 |" in md
    assert "seg/alt/f0.125/s0" in md                                    # the unreadable trial is listed
    assert "- `seg/alt/f0.0625/s0`" in md and "- `seg/alt/f1/s0`" not in md
    out = capsys.readouterr().out
    assert "recap vs alt" in out


def test_report_cli_with_positional_dir_and_other_out(results, tmp_path):
    out = tmp_path / "elsewhere"
    rc = cli_main(["report", str(results), f"out_dir={out}", "reference=recap", "bootstrap=0", "quiet=true"])
    assert rc == 0
    factors = json.loads((out / "factors.json").read_text())
    assert factors["seg"]["reference"] == "recap"
    assert factors["seg"]["backbones"]["alt"]["reached"] is False       # alt never reaches recap's 0.56
    assert (out / "seg.png").is_file() and not (results / "report.md").exists()


def test_report_missing_dir_is_a_user_error(tmp_path, capsys):
    assert cli_main(["report", str(tmp_path / "nope")]) == 2
    assert "results_dir not found" in capsys.readouterr().err


def test_find_metric_locations():
    assert find_metric({"miou": 0.5}, "miou") == 0.5
    assert find_metric({"metrics": {"miou": 0.4}}, "miou") == 0.4
    assert find_metric({"eval": {"final": {"map": 0.3}}}, "eval.final.map") == 0.3
    assert find_metric({"val/mIoU": 0.2, "config": {"miou": 9}}, "miou") == 0.2
    assert find_metric({"a/miou": 0.2, "b/miou": 0.3}, "miou") is None  # ambiguous
