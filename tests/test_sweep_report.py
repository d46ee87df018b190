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
    # alt's full data 0.42 (its power fit passes through the three means); recap is better everywhere
    assert factors["seg"]["target"] == pytest.approx(0.42, abs=1e-3)
    assert [t["level"] for t in seg["targets"]] == [1.0, 0.95]
    assert seg["targets"][1]["target"] == pytest.approx(0.95 * factors["seg"]["target"])
    assert 1 / 4 < seg["fraction"] < 1 / 2
    assert seg["factor"] == pytest.approx(seg["reference_fraction"] / seg["fraction"])
    assert seg["ci_low"] <= seg["factor"] <= seg["ci_high"] and seg["df"] == 1      # 2 seeds at 1/2
    assert [d["fraction"] for d in seg["deltas"]] == [0.25, 0.5, 1.0]
    assert seg["deltas"][0]["delta"] == pytest.approx(0.16) and seg["deltas"][0]["ci_low"] > 0
    depth = factors["depth"]["backbones"]["recap"]
    assert factors["depth"]["mode"] == "min" and depth["targets"][1]["target"] == pytest.approx(0.5 * 1.05, abs=1e-3)
    assert depth["reached"] and 2 < depth["factor"] < 4
    assert depth["ci_low"] is None and depth["df"] == 0               # one seed at 1/4 and 1/2: no interval
    md = (results / "report.md").read_text()
    assert "## seg: mIoU (higher is better)" in md and "## depth: rmse (lower is better)" in md
    assert "| recap | ? | 0.25 | 3 | 0.3800 | 0.0200 |" in md  # no backbone provenance in these fixtures
    assert "| condition | target | factor | 95% CI |" in md and "| recap | 100% = " in md
    assert "| recap | 1 pretraining run | 0.25 | +0.1600 |" in md
    assert "Finetuning schedule across fractions: iterations (not recorded" in md
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


def test_ci_level_and_settings_fall_back_to_the_sweep(results):
    (results / "sweep.json").write_text(json.dumps({"report": {"reference": "alt", "bootstrap": 100, "ci": 0.9,
                                                               "targets": [1.0, 0.9]}}))
    run(ReportConfig(results_dir=str(results), quiet=True, targets=[1.0]))
    md = (results / "report.md").read_text()
    assert "| 90% CI |" in md and "95% CI" not in md                  # the header follows the configured level
    seg = json.loads((results / "factors.json").read_text())["seg"]["backbones"]["recap"]
    assert [t["level"] for t in seg["targets"]] == [1.0]               # given here: wins over the sweep's
    assert seg["n_bootstrap"] == 100 and seg["ci"] == 0.9             # not given: the sweep's


def test_old_layout_without_trial_json_or_new_keys(tmp_path):
    """A sweep written before conditions and schedule_by: path coordinates only, a sweep.json with the old report
    keys (and one this version does not know), metrics at the top level: it still reports."""
    root = tmp_path / "old"
    for bb, base in (("alt", 0.30), ("recap", 0.34)):
        for f in (0.25, 0.5, 1.0):
            for seed in range(3):
                d = root / "trials" / "seg" / bb / f"f{f:.6g}" / f"s{seed}"
                d.mkdir(parents=True)
                (d / "metrics.json").write_text(json.dumps({"mIoU": base + 0.03 * math.log2(f) + 0.002 * seed}))
    (root / "sweep.json").write_text(json.dumps({"report": {"reference": "alt", "bootstrap": 200, "ci": 0.95,
                                                            "seed": 0, "retired_key": 1},
                                                 "backbones": [{"name": "alt"}, {"name": "recap"}]}))
    summary = run(ReportConfig(results_dir=str(root), quiet=True))
    assert summary["trials"] == 18 and summary["unreadable"] == 0
    recap = json.loads((root / "factors.json").read_text())["seg"]["backbones"]["recap"]
    assert recap["factor"] == pytest.approx(2 ** (0.04 / 0.03), rel=1e-3) and recap["runs"] == ["recap"]
    assert "iterations (not recorded" in summary["schedule_by"]


def test_backbones_grouped_by_condition_are_pretraining_runs(tmp_path):
    root = tmp_path / "runs"
    names = {"alt-s0": ("alt", 0.30), "alt-s1": ("alt", 0.31), "recap-s0": ("recap", 0.35), "recap-s1": ("recap", 0.33)}
    for bb, (cond, base) in names.items():
        for f in (0.25, 0.5, 1.0):
            for seed in range(3):
                d = root / "trials" / "seg" / bb / f"f{f:.6g}" / f"s{seed}"
                d.mkdir(parents=True)
                (d / "metrics.json").write_text(json.dumps({"metrics": {"mIoU": base + 0.03 * math.log2(f)
                                                                        + 0.003 * seed}}))
                (d / "trial.json").write_text(json.dumps({"task": "seg", "backbone": bb, "fraction": f, "seed": seed,
                                                          "metric": "mIoU", "mode": "max", "condition": cond,
                                                          "schedule_by": "epochs", "total_steps": int(40 * f)}))
    summary = run(ReportConfig(results_dir=str(root), reference="alt", bootstrap=300, quiet=True))
    entry = json.loads((root / "factors.json").read_text())["seg"]
    assert entry["reference"] == "alt" and entry["reference_runs"] == ["alt-s0", "alt-s1"]
    recap = entry["backbones"]["recap"]
    assert list(entry["backbones"]) == ["recap"] and recap["runs"] == ["recap-s0", "recap-s1"]
    assert recap["df"] == 1 and recap["runs_paired"]                    # paired: (2 - 1)(2 - 1)
    assert recap["factor"] == pytest.approx(2 ** ((0.34 - 0.305) / 0.03), rel=1e-3)
    # run SD before pooling: alt's runs differ by 0.01, recap's by 0.02 (opposite way), at every fraction; the
    # pooled two-way residual SD (replicate effect removed): 4 residuals of 0.0075, df 1
    assert entry["run_sd"]["alt"]["1"] == pytest.approx(0.01 / math.sqrt(2))
    assert entry["run_sd"]["recap"]["0.25"] == pytest.approx(0.02 / math.sqrt(2))
    assert recap["pooled_run_sd"]["1"] == pytest.approx(0.015) and recap["run_df"] == 1
    assert summary["schedule_by"].startswith("epochs")
    md = (root / "report.md").read_text()
    assert "2 pretraining runs: recap-s0, recap-s1" in md
    assert "| condition | runs | f=0.25 | f=0.5 | f=1 |" in md and "| recap | 2 | 0.0141 | 0.0141 | 0.0141 |" in md
    assert "| pooled for recap (paired) | df 1 | 0.015 | 0.015 | 0.015 |" in md


def test_factor_and_interval_texts_mark_censoring():
    from clipdense.sweep.report_text import factor_text, interval_text

    censored = {"factor": 16.0, "reached": True, "censored": True, "ci_low": 3.1, "ci_high": 16.0,
                "ci_low_open": False, "ci_high_open": True}
    assert (factor_text(censored), interval_text(censored)) == ("≥ 16x", "[3.1, ≥ 16]")
    bound_only = {**censored, "ci_low": 16.0}
    assert interval_text(bound_only) == "≥ 16"
    missed = {"factor": 1.0, "reached": False, "censored": False, "ci_low": 1.0, "ci_high": 1.0,
              "ci_low_open": True, "ci_high_open": False}
    assert (factor_text(missed), interval_text(missed)) == ("< 1x (not reached)", "< 1")
    assert interval_text({"ci_low": None, "ci_high": None}) == "n/a"


def test_report_on_the_folder_above_a_sweep_reads_that_sweep(results, tmp_path):
    """`clipdense report runs/sweep` where the sweep is runs/sweep/<name>: its trials and sweep.json settings, or a
    one-line error where several sweeps sit below."""
    (results / "sweep.json").write_text(json.dumps({"report": {"reference": "recap", "bootstrap": 0}}))
    assert cli_main(["report", str(tmp_path), "quiet=true"]) == 0
    factors = json.loads((results / "factors.json").read_text())
    assert factors["seg"]["reference"] == "recap"                         # the sweep's report setting, not lost
    other = tmp_path / "other"
    other.mkdir()
    (other / "sweep.json").write_text("{}")
    assert cli_main(["report", str(tmp_path)]) == 2


def test_runs_line_up_by_replicate_index():
    """Run r of each condition pairs with run r of the reference: backbones sort with numbers as numbers."""
    from clipdense.sweep.report import conditions

    names = ["alt", "alt-r10", "alt-r2", "alt-r1"]
    rows = [{"task": "seg", "hp": None, "backbone": n, "condition": "alt"} for n in names]
    assert conditions(rows, "seg", {}) == {"alt": ["alt", "alt-r1", "alt-r2", "alt-r10"]}


def test_gains_over_the_floors_are_direction_aware_and_pool_runs():
    """Each condition's gain over random-init and position-only, per fraction: > 0 = better for a lower-is-better
    metric too; a condition's runs are averaged; a floor the sweep lacks is left out."""
    from clipdense.sweep.report import floor_gains

    def row(bb, f, mean):
        return {"task": "depth", "backbone": bb, "fraction": f, "mean": mean, "mode": "min"}

    table = [row("recap", 1.0, 0.8), row("recap-r1", 1.0, 1.0), row("random-init", 1.0, 1.2),
             row("position-only", 1.0, 0.7), row("recap", 0.5, 1.5), row("random-init", 0.5, 1.4)]
    gains = floor_gains(table, "depth", ["random-init", "position-only", "absent"],
                        {"recap": ["recap", "recap-r1"], "random-init": ["random-init"],
                         "position-only": ["position-only"]})
    assert set(gains) == {"recap"}
    assert gains["recap"]["random-init"] == pytest.approx({1.0: 0.3, 0.5: -0.1})
    assert gains["recap"]["position-only"] == pytest.approx({1.0: -0.2})
