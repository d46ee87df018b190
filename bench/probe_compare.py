"""The fitted probe (sweep protocol fit: ridge on frozen features cached once per tower, the penalty chosen by k-fold
inside each training subset) vs today's SGD probe (protocol finetune: frozen trunk + linear head, the demo's probe
overrides, a fixed number of AdamW steps), on the same towers, data subsets and eval images.

    python -m bench.probe_compare --towers /tmp/probe_towers [--steps 200] [--seeds 3] [--fractions 0.0625,0.25,1]
                                  [--fit-runs fit@crop,fit@128]

`--towers`: a finished `clipdense demo --out` folder: its pretraining exports (pretrain/<condition>/export) and its
world; a random init of the same tower is added (init seed 0). Both protocols score every eval image (the SGD
probe's `data.max_eval_images` is lifted) and train on the subsets `data.fraction` and `data.seed` pick. The fit
runs at the finetune crop (fit@crop: seg 64 px, depth 96 px, the images shrunk to it) and at the images' own 128 px
(fit@128: the tower's position table interpolated, as the SGD probe's whole-image depth evaluation does; its seg
evaluation slides 64 px windows). Ours = the fit's mean over seeds, peer = the SGD probe's; ratio > 1: the fit is
better. Notes give each side's seed SD and the
wall time of each whole sweep (Ray start, feature extraction and every fit / every trial) is a row of its own. The
fit's position-only row (features that know where a patch is and nothing of the image) has no SGD peer. Figures
taken while the 1-minute load average was above the limit are marked loaded. Not part of `bench.run` (needs a
finished demo).
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from bench.common import RoundLoads, load_note, row, write_report
from clipdense.config import build_config, configs_dir, read_yaml
from clipdense.sweep import SweepConfig
from clipdense.sweep import run as run_sweep
from clipdense.sweep.report import collect

TASK_DIRS = {"seg": "ade", "depth": "nyu"}


def towers(demo: Path, model: str) -> list[dict]:
    """Every exported pretraining run of the demo, then a random init of the same tower."""
    found = sorted(p.parent.parent for p in (demo / "pretrain").glob("*/export/model.pt"))
    if not found:
        raise SystemExit(f"{demo}/pretrain/*/export/model.pt: no exported towers (run clipdense demo first)")
    return [*({"name": p.name, "backbone": {"name": model, "checkpoint": str(p / "export" / "model.pt")}}
              for p in found),
            {"name": "random-init", "backbone": {"name": model, "checkpoint": None, "init_seed": 0}}]


def tasks(world: Path, steps: int) -> list[dict]:
    """The demo's probe tasks (configs/demo/stages/sweep.yaml) with `steps` SGD steps, every eval image."""
    entries = read_yaml(configs_dir() / "demo" / "stages" / "sweep.yaml")["tasks"]
    for task in entries:
        ov = task["overrides"]
        ov.pop("data.max_eval_images", None)
        ov.update({"train.schedule.total_steps": steps, "train.schedule.warmup_steps": max(1, steps // 10),
                   "train.log_every": max(1, steps // 5), "data.root": str(world / TASK_DIRS[task["name"]])})
    return entries


def sweep(run: str, out: Path, backbones: list[dict], task_entries: list[dict], a) -> SweepConfig:
    """`run`: "finetune" (the SGD probe), or "fit@crop" / "fit@<side>" (the fitted probe at the finetune crop, or
    with every image resized to side x side)."""
    protocol, _, where = run.partition("@")
    fit = {"resolution": [int(where)] * 2} if where and where != "crop" else {}
    bbs = backbones + ([{"name": "position-only", "backbone": {"name": "position-only"}}] if protocol == "fit" else [])
    return build_config(SweepConfig, {
        "name": f"probe-{protocol}", "out": str(out / run.replace("@", "-")), "protocol": protocol, "fit": fit,
        "backbones": bbs, "tasks": task_entries, "fractions": a.fractions, "seeds": a.seeds,
        "small_fraction_seeds": None, "resources": {"cpu": 1.0, "max_concurrent_trials": 2}, "run_report": False,
        "verbose": 0, "ray": {"num_cpus": 2}}, f"bench probe_compare ({run})")


def summarise(out: Path) -> dict[tuple[str, str, float], dict]:
    """(task, backbone, fraction) -> mean, SD over seeds (ddof 1), seeds, metric, mode."""
    rows, errors = collect(out)
    if errors:
        print(f"unreadable trials in {out}: {errors[:3]}", flush=True)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["task"], r["backbone"], r["fraction"])].append(r)
    out_: dict[tuple, dict] = {}
    for key, rs in groups.items():
        v = np.array([r["value"] for r in rs])
        out_[key] = {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": len(v),
                     "metric": rs[0]["metric"], "mode": rs[0]["mode"]}
    return out_


def figure_rows(run: str, fit: dict, sgd: dict, steps: int, loads: RoundLoads) -> list[dict]:
    rows = []
    for (task, bb, f), ours in sorted(fit.items()):
        peer = sgd.get((task, bb, f))
        note = f"fit SD {ours['sd']:.4f} over {ours['n']} seeds"
        if peer:
            note += f"; SGD SD {peer['sd']:.4f} over {peer['n']} seeds"
        rows.append(row("probe-compare", f"{run} {task} {bb} fraction {f:.6g} {ours['metric']}", ours["mean"],
                        peer["mean"] if peer else None, f"SGD linear probe, {steps} steps" if peer else "",
                        ours["metric"], higher_is_better=ours["mode"] == "max", notes=note, rounds=loads))
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m bench.probe_compare")
    ap.add_argument("--towers", required=True, help="a finished `clipdense demo --out` folder")
    ap.add_argument("--out", default="/tmp/probe_compare", help="where both sweeps write their trials")
    ap.add_argument("--model", default="clip-tiny", help="the towers' open_clip model name")
    ap.add_argument("--steps", type=int, default=200, help="SGD probe steps (the default demo preset's)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--fractions", type=lambda s: [float(x) for x in s.split(",")], default=[0.0625, 0.25, 1.0])
    ap.add_argument("--fit-runs", type=lambda s: s.split(","), default=["fit@crop", "fit@128"],
                    help="fitted probes to run: fit@crop (the finetune crop) and/or fit@<side> px")
    ap.add_argument("--wait", type=float, default=300.0, help="seconds to wait for a quiet machine before a sweep")
    a = ap.parse_args(argv)
    demo, out = Path(a.towers), Path(a.out)
    backbones, task_entries = towers(demo, a.model), tasks(demo / "world", a.steps)
    loads, walls, results = RoundLoads(timeout_s=a.wait), {}, {}
    for run in [*a.fit_runs, "finetune"]:
        loads.start_round()
        print(f"probe_compare {run}: {load_note()}", flush=True)
        t0 = time.perf_counter()
        summary = run_sweep(sweep(run, out, backbones, task_entries, a))
        walls[run] = time.perf_counter() - t0
        if summary["failed"]:
            print(f"{run}: {len(summary['failed'])} failed, e.g. {summary['failed'][0]}", flush=True)
        results[run] = summarise(out / run.replace("@", "-"))
    rows = [r for run in a.fit_runs for r in figure_rows(run, results[run], results["finetune"], a.steps, loads)]
    for run in a.fit_runs:
        rows.append(row("probe-compare", f"{run} wall time of the whole sweep", walls[run], walls["finetune"],
                        f"SGD probe sweep ({a.steps} steps a trial)", "s", higher_is_better=False, rounds=loads,
                        notes=f"fit: {sum(v['n'] for v in results[run].values())} fits incl. position-only, "
                              "features extracted once per tower and task; SGD: "
                              f"{sum(v['n'] for v in results['finetune'].values())} Tune trials; 2 at a time on "
                              f"a 2-CPU local Ray; {load_note()}"))
    print(write_report("probe_compare", "Fitted probe vs SGD probe", __doc__, rows))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
