"""The benchmark harness's plumbing (bench/): row ratios, the markdown table, the one-command runner, and the GPU
bench's quick mode on CPU with Ray made unimportable (the GPU box has no Ray). No timing assertions."""
from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from bench import common, run

REPO = Path(__file__).resolve().parents[1]


def test_row_ratio_is_ours_over_peer_in_the_better_direction():
    fast = common.row("b", "samples/s", 120.0, 100.0, "peer", "samples/s")
    assert fast["ratio"] == 1.2
    quick_step = common.row("b", "step", 80.0, 100.0, "peer", "ms", higher_is_better=False)
    assert quick_step["ratio"] == 1.25  # fewer ms than the peer is better: ratio > 1
    assert common.row("b", "wall", 12.0, None, "", "s")["ratio"] is None
    failed = common.row("b", "x FAILED", None, 10.0, "peer", "")
    assert failed["ratio"] is None and failed["ours"] is None


def test_markdown_table_lists_every_row_and_skips_files_without_rows():
    rows = [common.row("pretrain", "samples/s", 363.3, 324.9, "open_clip_train", "samples/s", notes="a | b"),
            common.row("demo", "wall", 95.0, None, "", "s")]
    payloads = [{"name": "x", "date": "2026-11-24T00:00:00", "hardware": "cpu", "rows": rows},
                {"name": "adhoc", "device": "H100", "B": 256}]  # an ad-hoc check's own layout
    md = common.markdown(payloads).splitlines()
    assert len(md) == 2 + 2
    assert "| 1.12x |" in md[2] and "open_clip_train" in md[2] and "a / b" in md[2]  # notes cannot break columns
    assert md[3].count("|") == md[0].count("|")  # an empty peer and ratio keep the column count


def test_the_table_keeps_the_latest_run_of_each_figure():
    old = {"date": "2026-11-24T17:00:00", "hardware": "gpu", "rows": [
        common.row("gpu-pretrain", "ViT-B-16 samples/s", 1600.0, 1500.0, "peer", "samples/s"),
        common.row("gpu-pretrain", "MobileCLIP-S2 FAILED", None, None, "", ""),
        common.row("gpu-recaption", "coca_ViT-L-14 captions/s", 83.0, None, "", "captions/s")]}
    mid = {"date": "2026-11-24T19:50:00", "hardware": "gpu", "rows": [
        common.row("gpu-pretrain", "MobileCLIP-S2 samples/s", 340.0, 325.0, "peer", "samples/s"),
        common.row("gpu-recaption", "gpu-recaption coca_ViT-L-14 FAILED", None, None, "", ""),
        common.row("gpu-recaption", "ViT-L-14 FAILED", None, None, "", "")]}       # nothing later measured it
    new = {"date": "2026-11-24T19:52:00", "hardware": "gpu", "rows": [
        common.row("gpu-recaption", "coca_ViT-L-14 captions/s", 260.0, 134.0, "peer", "captions/s")]}
    kept = common.latest_figures([old, mid, new, {"name": "adhoc"}])
    assert [[r["metric"] for r in p.get("rows", [])] for p in kept] == [
        ["ViT-B-16 samples/s"], ["MobileCLIP-S2 samples/s", "ViT-L-14 FAILED"], ["coca_ViT-L-14 captions/s"], []]
    assert kept[2]["rows"][0]["ours"] == 260.0 and kept[3] == {"name": "adhoc"}


def test_median_rate_drops_the_warmup_interval():
    assert common.median_rate([1.0, 10.0, 12.0, 11.0]) == 11.0
    assert common.median_rate([1.0, 10.0]) == 5.5  # too few intervals to drop one
    with pytest.raises(ValueError):
        common.median_rate([])


def test_write_report_writes_json_and_markdown(tmp_path):
    rows = [common.row("finetune", "step time", 250.0, 260.0, "plain loop", "ms", higher_is_better=False)]
    md = common.write_report("finetune_step", "Title", "doc text", rows, tmp_path)
    payload = json.loads((tmp_path / "finetune_step.json").read_text())
    assert payload["rows"] == rows and payload["hardware"] and payload["date"]
    assert (tmp_path / "finetune_step.md").read_text() == md and md.startswith("# Title\n\ndoc text")


def test_runner_runs_each_bench_keeps_going_after_a_failure_and_writes_the_table(tmp_path, monkeypatch):
    calls = []

    def ok_main(quick=False, full=False):
        calls.append(("ok", quick, full))
        common.save("ok", [common.row("ok", "m", 2.0, 1.0, "p", "u")], tmp_path)

    def broken_main(quick=False):
        calls.append(("broken", quick))
        raise RuntimeError("boom")

    for name, fn in (("fake_ok", ok_main), ("fake_broken", broken_main)):
        mod = types.ModuleType(name)
        mod.main = fn
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(run, "CPU_BENCHES", {"broken": "fake_broken", "ok": "fake_ok"})
    monkeypatch.setattr(run, "RESULTS", tmp_path)
    assert run.main(["--quick", "--full"]) == 1  # one failed: non-zero, but the other still ran
    assert calls == [("broken", True), ("ok", True, True)]  # `full` only reaches mains that take it
    table = (tmp_path / "README.md").read_text()
    assert "| ok | m | 2.0 | 1.0 (p) | 2.00x |" in table
    assert run.main(["nonexistent"]) == 2


BLOCK_RAY = """
import sys
class NoRay:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("ray is not installed on the GPU box")
sys.meta_path.insert(0, NoRay())
from pathlib import Path
from bench.gpu import main
main(quick=True, out_dir=Path(sys.argv[1]))
"""


@pytest.mark.slow
def test_gpu_bench_quick_mode_runs_without_ray(tmp_path):
    p = subprocess.run([sys.executable, "-c", BLOCK_RAY, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads((tmp_path / "gpu.json").read_text())["rows"]
    assert not [r for r in rows if "FAILED" in r["metric"]], [r["notes"] for r in rows]
    benches = {r["bench"] for r in rows}
    assert {"gpu-pretrain", "gpu-recaption", "gpu-finetune"} <= benches
    peered = [r for r in rows if r["metric"].endswith("samples/s") or r["bench"] == "gpu-finetune"]
    assert peered and all(r["ratio"] is not None and r["ours"] > 0 and r["peer"] > 0 for r in peered)


def test_rounds_wait_for_a_quiet_machine_and_mark_loaded_figures():
    # The machine's load cannot be set from a test: a scripted load average stands in for os.getloadavg.
    readings = iter([3.0, 2.2, 1.2])
    slept = []
    load = common.wait_for_quiet(1.5, timeout_s=60, poll_s=5, sleep=slept.append,
                                 loadavg=lambda: (next(readings), 0.0, 0.0))
    assert load == 1.2 and slept == [5, 5]  # waited until the load fell under the limit
    stuck = common.wait_for_quiet(1.5, timeout_s=10, poll_s=5, sleep=lambda s: None, loadavg=lambda: (4.0, 0, 0))
    assert stuck == 4.0  # gave up after the timeout; the caller records it

    quiet, busy = common.RoundLoads(limit=1.5), common.RoundLoads(limit=1.5)
    quiet.loads, busy.loads = [0.9, 1.1], [0.9, 2.4]
    assert not quiet.loaded and busy.loaded
    r = common.row("pretrain", "samples/s", 100.0, 90.0, "peer", "samples/s", rounds=busy)
    assert r["loaded"] is True and r["load_1m_before_rounds"] == [0.9, 2.4]
    md = common.markdown([{"name": "x", "date": "2026-11-29T00:00:00", "hardware": "cpu", "rows": [r]}])
    assert "LOADED" in md
    ok = common.row("pretrain", "samples/s", 100.0, 90.0, "peer", "samples/s", rounds=quiet)
    assert "LOADED" not in common.markdown([{"name": "x", "date": "2026-11-29", "hardware": "cpu", "rows": [ok]}])
    assert common.quiet_limit(2) == 1.5
