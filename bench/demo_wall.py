"""Wall time of `clipdense demo --quick` (synth -> captioner -> recaption -> 2 pretrains -> sweep -> report).

    python -m bench.demo_wall [--full]

No peer (nothing else runs this pipeline): the ratio is empty. The demo runs as a subprocess in a fresh output
directory (no finished-step markers); the per-step seconds come from its `.done-N` markers. `--full` also times
the default-scale demo (much slower; not part of routine runs). A failing demo becomes a row whose notes hold
the error's last lines, so the harness still writes the rest.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import load_note, row, write_report

STEPS = ["synth", "captioner", "recaption", "pretrain x2", "sweep", "report"]


def time_demo(quick: bool, timeout_s: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-demo-") as tmp:
        out = Path(tmp) / "demo"
        argv = [sys.executable, "-m", "clipdense.cli", "demo", "--out", str(out)] + (["--quick"] if quick else [])
        t0 = time.perf_counter()
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
            rc, text = p.returncode, p.stdout + p.stderr
        except subprocess.TimeoutExpired as e:
            rc, text = -1, f"timed out after {timeout_s}s\n{(e.stdout or b'')[-2000:]!r}"
        wall = time.perf_counter() - t0
        steps = {}
        for i, name in enumerate(STEPS, 1):
            marker = out / f".done-{i}"
            if marker.is_file():
                steps[name] = float(marker.read_text().strip() or 0)
    tail = [ln for ln in text.strip().splitlines() if ln.strip()][-4:]
    return {"ok": rc == 0, "rc": rc, "wall_s": wall, "steps": steps, "tail": " / ".join(tail)[-600:]}


def _row(label: str, r: dict) -> dict:
    steps = ", ".join(f"{k} {v:.0f}s" for k, v in r["steps"].items())
    if r["ok"]:
        return row("demo", f"{label} wall time", r["wall_s"], None, "", "s", higher_is_better=False,
                   notes=f"steps: {steps}; {load_note()}")
    return row("demo", f"{label} FAILED (rc {r['rc']})", None, None, "", "s",
               notes=f"after {r['wall_s']:.0f}s; finished steps: {steps or 'none'}; {r['tail']}")


def main(quick: bool = False, full: bool = False, argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m bench.demo_wall")
    ap.add_argument("--full", action="store_true", help="also time the default-scale demo")
    ap.add_argument("--timeout", type=int, default=3600)
    a = ap.parse_args(argv or [])
    rows = [_row("clipdense demo --quick", time_demo(True, a.timeout))]
    if full or a.full:
        rows.append(_row("clipdense demo (default scale)", time_demo(False, 6 * a.timeout)))
    print(write_report("demo_wall", "Demo wall time", __doc__, rows))
    return rows


if __name__ == "__main__":
    main(argv=sys.argv[1:])
