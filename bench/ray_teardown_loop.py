"""Failed Ray Train runs in a loop, each followed by what our code and tests do next, counting crashes of the caller.

    python -m bench.ray_teardown_loop [--loops 30] [--batch 10] [--variants inline,isolated] [--after restart,refit]

One loop: `clipdense.train.fit` of a toy run whose rank 0 raises a user error (DataError) at step 1, so
Ray Train tears the worker group and its TrainController actor down; then, at once, either `restart`
(`ray.shutdown()` + `ray.init()`) or `refit` (a second, successful 2-step
run on the same cluster, as a retry or the next test does). Loops run in batches, each batch in one child process
(one driver, as a pytest session or a user's script); a batch that ends by a signal, or with Ray's `Check failed`
in its stderr, is a caller crash. Variants: `inline` drives the run from the caller itself (the code before the
fix, `CLIPDENSE_TRAIN_DRIVER=inline`), `isolated` from a driver host child process (`clipdense.train.isolate`, the
default now). For `isolated`, a host that died and was replaced is counted as contained, not as a crash. Each loop
also checks that the worker's user error reached the caller as its one line.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from bench.common import RoundLoads, load_note, row, write_report
from clipdense.config import DataError, build_config
from clipdense.train import TrainConfig, TrainTask, fit

PLANTED = "shard bench-00000.tar row 3: no caption (the bench's planted user error)"


class FailingToy(TrainTask):
    """A linear fit whose rank 0 raises a user error at step `fail_at` (None: never)."""

    fail_at: int | None = 1

    def build_model(self):
        return nn.Linear(4, 1)

    def train_batches(self, ctx):
        for i in range(ctx.start_batch, 8):
            x = torch.randn(4, 4, generator=torch.Generator().manual_seed(ctx.epoch * 100 + ctx.rank * 10 + i))
            yield {"x": x, "y": x.sum(1, keepdim=True)}

    def loss(self, model, batch, ctx):
        if ctx.rank == 0 and ctx.step == self.fail_at:
            raise DataError(PLANTED)
        return nn.functional.mse_loss(model(batch["x"]), batch["y"]), {}


class PassingToy(FailingToy):
    fail_at = None


def run_config(out: Path, steps: int) -> TrainConfig:
    return build_config(TrainConfig, {
        "out_dir": str(out), "schedule": {"total_steps": steps, "warmup_steps": 1}, "log_every": 2,
        "checkpoint": {"every_steps": 2, "keep": 1}, "max_failures": 0,
        "scaling": {"num_workers": int(os.environ.get("BENCH_TEARDOWN_WORKERS", "1")), "cpus_per_worker": 0.5}})


def start_ray():
    import ray  # the child's own local cluster, as tests/conftest.py starts it

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    return ray


def child(loops: int, after: str) -> None:
    """One driver: `loops` failed runs, each followed by `after`; one `LOOP` line per finished loop."""
    ray = start_ray()
    with tempfile.TemporaryDirectory(prefix="bench-teardown-") as tmp:
        for i in range(loops):
            t0 = time.perf_counter()
            one_line = False
            try:
                fit(FailingToy, run_config(Path(tmp) / f"fail{i}", 3), name=f"fail{i}")
            except DataError as e:
                one_line = str(e) == PLANTED
            if after == "restart":
                ray.shutdown()
                ray = start_ray()
            else:
                fit(PassingToy, run_config(Path(tmp) / f"pass{i}", 2), name=f"pass{i}")
            print(f"LOOP {i} {time.perf_counter() - t0:.2f} {int(one_line)}", flush=True)
    ray.shutdown()


def batch(variant: str, after: str, loops: int, timeout_s: float) -> dict:
    """Run one child batch; what happened to it."""
    env = {**os.environ, "CLIPDENSE_TRAIN_DRIVER": "inline" if variant == "inline" else "child"}
    cmd = [sys.executable, "-m", "bench.ray_teardown_loop", "--child", "--loops", str(loops), "--after", after]
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, errors="replace", timeout=timeout_s)
        out, err, code = p.stdout, p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        out, err, code = (e.stdout or b"").decode(errors="replace"), (e.stderr or b"").decode(errors="replace"), None
    done = [line.split() for line in out.splitlines() if line.startswith("LOOP ")]
    checks = re.findall(r"Check failed[^\n]{0,120}", err)
    crashed = code is None or code < 0 or bool(checks) or (code != 0 and len(done) < loops)
    return {"loops": len(done) + (1 if crashed and len(done) < loops else 0), "crashed": crashed, "code": code,
            "hung": code is None, "checks": checks, "seconds": [float(d[2]) for d in done],
            "one_line": sum(int(d[3]) for d in done), "contained": err.count("Ray Train driver process (pid")}


def measure(variant: str, after: str, loops: int, batch_size: int, rounds: RoundLoads) -> dict:
    """At least `loops` loops of one variant, in batches; totals."""
    total = {"loops": 0, "crashes": 0, "hangs": 0, "contained": 0, "one_line": 0, "seconds": [], "checks": []}
    while total["loops"] < loops:
        rounds.start_round()
        b = batch(variant, after, min(batch_size, loops - total["loops"]), timeout_s=120 + 60 * batch_size)
        total["loops"] += max(b["loops"], 1)
        total["crashes"] += int(b["crashed"])
        total["hangs"] += int(b["hung"])
        for key in ("contained", "one_line"):
            total[key] += b[key]
        total["seconds"] += b["seconds"]
        total["checks"] += b["checks"]
        print(f"{variant:8s} after={after:7s} batch: {b['loops']} loops, crashed={b['crashed']} code={b['code']} "
              f"contained={b['contained']} {b['checks'][:1]}", flush=True)
    return total


def figures(after: str, ours: dict, peer: dict, rounds: RoundLoads) -> list[dict]:
    def note(t: dict) -> str:
        secs = sorted(t["seconds"])
        median = secs[len(secs) // 2] if secs else float("nan")
        return (f"{t['loops']} loops, {t['crashes']} crashes ({t['hangs']} hangs), {t['contained']} driver hosts "
                f"died and were replaced, user error one line in {t['one_line']}, median {median:.1f} s/loop"
                + (f", first check: {t['checks'][0]}" if t["checks"] else ""))

    def median(t: dict) -> float | None:
        secs = sorted(t["seconds"])
        return secs[len(secs) // 2] if secs else None

    common = {"peer_name": "driver in the caller (before)", "higher_is_better": False, "rounds": rounds}
    return [row("ray_teardown_loop", f"caller crashes, failed run then {after}", ours["crashes"], peer["crashes"],
                unit=f"crashes in {ours['loops']} (ours) / {peer['loops']} (peer) loops",
                notes=f"isolated: {note(ours)}; inline: {note(peer)}; {load_note()}", **common),
            row("ray_teardown_loop", f"seconds per loop, failed run then {after}", median(ours), median(peer),
                unit="s", notes="the cost of driving each run from a child process", **common)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.ray_teardown_loop")
    ap.add_argument("--loops", type=int, default=30)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--variants", default="inline,isolated")
    ap.add_argument("--after", default="restart,refit")
    ap.add_argument("--workers", type=int, default=1, help="Ray Train workers per run")
    ap.add_argument("--child", action="store_true")
    args = ap.parse_args(argv)
    os.environ["BENCH_TEARDOWN_WORKERS"] = str(args.workers)  # the batches' children read it
    if args.child:
        child(args.loops, args.after)
        return 0
    rounds, rows = RoundLoads(quick=True), []
    for after in args.after.split(","):
        got = {v: measure(v, after, args.loops, args.batch, rounds) for v in args.variants.split(",")}
        if {"inline", "isolated"} <= set(got):
            rows += figures(after, got["isolated"], got["inline"], rounds)
    if rows:
        print(write_report("ray_teardown_loop", "Failed Ray Train runs in a loop: caller crashes", __doc__, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
