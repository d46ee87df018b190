"""Simulation study of the data-efficiency factor's interval (clipdense.sweep.factor): coverage and error.

    python -m bench.factor_sim [--sweeps 100] [--run-sweeps 100] [--bootstrap 250] [--weights seeds]

Each simulated sweep has a reference curve A and a candidate B(f) = A(k f) (the reference shifted by the true
factor k in log-fraction), measured at the default sweep grid (fractions 1/64 .. 1) with n finetuning seeds. Shapes:
`rising` (linear in log f: still rising at full data) and `flattening` (a power law whose slope per octave halves
every two octaves, as the demo's seg curve does). Scores are in units of the curve's slope per octave at full data.
Noise per trial has three parts, each a third of the variance: a seed effect shared by all fractions and both
backbones (the seed's data subset; pairing cancels it), a seed effect shared by all fractions of one backbone, and
per-trial noise; its total std at full data is `noise` octaves of slope and grows as f^-0.2 towards small fractions.
The default demo's seg probe (bench/results/demo_default/report.md) has seed stds 0.009-0.014 and slopes 0.010 per
octave near full data (0.022 below): noise ~0.9 there. 0.25 is a quieter sweep (4x less variance: e.g. a 4x larger
eval set, or a steeper curve). True factors 2, 4, 10 at the
two targets (level 1 and 0.95 of the reference's full-data score; the shift model gives the same factor at both).

Pretraining runs (the second table): the demo preset's grid (fractions 1/256, 1/64, 1/16, 1/4, 1; 5 subset seeds
below fraction 1, one exact seed at 1 with no seed noise, as a deterministic probe on the whole set gives) with R
pretraining runs per condition. Each run adds a run effect of total std `run_noise` (slopes): half an offset shared
by all its fractions, half independent per fraction. `paired`: half the offset's variance is shared by replicate r
of both conditions (the same pretraining seed), which the interval's shared run weights cancel; `unpaired`: every
run's effect is its own (what pairing must not make overconfident). Seed noise is as above (`noise` 0.5). Two more
conditions (shifted by 1/2 and 2) join each comparison's run pool, as the demo's four conditions do in its report.

Both tables run each cell with the fits weighted by seed counts (`seeds`, the default) and by the inverse variance
of each fraction's mean (`inverse-variance`: the preset's exact full-data point then anchors the fit).

Reported per (shape, factor, seeds, noise): coverage of the nominal 95% interval (an open end counts as covering
beyond its bound), the median relative error of the point estimate |est/k - 1| (censored / not-reached estimates
count at their bound), the median interval width (high/low ratio) and how often the point is censored.
Writes bench/results/factor_sim.{json,md} (bench/common.py `save`: date, hardware, code version).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from pathlib import Path

import numpy as np

from bench.common import provenance_line, save, write_doc
from clipdense.sweep.factor import compare

FRACTIONS = [2.0 ** -k for k in range(6, -1, -1)]
RESULTS = Path(__file__).parent / "results"
FULL_SCORE = 30.0   # reference's full-data score in slopes: 95% of it lies 1.5 octaves down (demo seg: 0.32 / 0.01)


def curve_value(shape: str, f: np.ndarray) -> np.ndarray:
    """Score at fraction f (may exceed 1 for the shifted candidate), slope 1 per octave at f = 1."""
    x = np.log2(f)
    if shape == "rising":
        return FULL_SCORE + x
    return FULL_SCORE - (2.0 ** (-0.5 * x) - 1.0) / (0.5 * math.log(2))     # slope 2^(-x/2) per octave


def simulate(rng: np.random.Generator, shape: str, factor: float, seeds: int, noise: float,
             fractions=FRACTIONS, seeds_below: tuple[float, int] | None = None):
    """(reference, candidate) curves {fraction: {seed: value}} of one simulated sweep."""
    fr = np.asarray(fractions)
    n_at = [max(seeds, seeds_below[1]) if seeds_below and f < seeds_below[0] else seeds for f in fr]
    n = max(n_at)
    part = noise / math.sqrt(3)
    common = rng.normal(0, part, n)
    out = []
    for k in (1.0, factor):
        own = rng.normal(0, part, n)
        curve = {}
        for f, m in zip(fr, n_at):
            scale = f ** -0.2
            vals = curve_value(shape, k * f) + scale * (common[:m] + own[:m] + rng.normal(0, part, m))
            curve[float(f)] = {s: float(v) for s, v in enumerate(vals)}
        out.append(curve)
    return out


PRESET_FRACTIONS = [1 / 256, 1 / 64, 1 / 16, 1 / 4, 1.0]
POOL_SHIFTS = (0.5, 2.0)     # the demo's four conditions: two more join each comparison's run pool


def simulate_runs(rng: np.random.Generator, shape: str, factor: float, runs: int, noise: float, run_noise: float,
                  paired: bool, fractions=PRESET_FRACTIONS, seeds: int = 5, others: tuple = POOL_SHIFTS):
    """[reference, candidate, *others] as lists of `runs` curves (`seeds` seeds below fraction 1, one exact seed at
    1); the others are conditions shifted by `others` that join the run pool, as the report's other conditions do."""
    fr = np.asarray(fractions)
    part = noise / math.sqrt(3)
    common = rng.normal(0, part, seeds)                                   # the seed's subset: both conditions
    shared = rng.normal(0, run_noise * 0.5, runs) if paired else np.zeros(runs)   # replicate r's seed
    offset_sd = run_noise * math.sqrt(0.5 - (0.25 if paired else 0.0))
    out = []
    for k in (1.0, factor, *others):
        cond = []
        for r in range(runs):
            own = rng.normal(0, part, seeds)
            offset = shared[r] + rng.normal(0, offset_sd)
            curve = {}
            for f in fr:
                base = curve_value(shape, k * f) + offset + rng.normal(0, run_noise * math.sqrt(0.5))
                if f >= 1.0:
                    curve[float(f)] = {0: float(base)}
                    continue
                vals = base + f ** -0.2 * (common + own + rng.normal(0, part, seeds))
                curve[float(f)] = {s: float(v) for s, v in enumerate(vals)}
            cond.append(curve)
        out.append(cond)
    return out


def _score(res: dict, factor: float, stats: dict) -> None:
    for f in res["factors"]:
        lo_ok = f.ci_low_open or f.ci_low <= factor
        hi_ok = f.ci_high_open or factor <= f.ci_high
        stats.setdefault(f.level, []).append((lo_ok and hi_ok, abs(f.factor / factor - 1), f.ci_high / f.ci_low,
                                              f.censored, not f.reached))


def _summary(stats: dict) -> dict:
    out = {}
    for level, rows in stats.items():
        cov, err, width, cens, nr = (np.asarray(x, dtype=float) for x in zip(*rows))
        out[level] = {"coverage": float(cov.mean()), "median_rel_error": float(np.median(err)),
                      "median_ci_ratio": float(np.median(width)), "censored": float(cens.mean()),
                      "not_reached": float(nr.mean())}
    return out


def run_cell(shape: str, factor: float, seeds: int, noise: float, sweeps: int, n_bootstrap: int, seed: int = 0,
             fit: str = "power", seeds_below=None, weights: str = "seeds") -> dict:
    rng = np.random.default_rng(seed)
    stats: dict = {}
    for i in range(sweeps):
        ref, cand = simulate(rng, shape, factor, seeds, noise, seeds_below=seeds_below)
        _score(compare(ref, cand, True, n_bootstrap=n_bootstrap, seed=i, fit=fit, targets=(1.0, 0.95),
                       weights=weights), factor, stats)
    return _summary(stats)


def run_cell_runs(shape: str, factor: float, runs: int, paired: bool, run_noise: float, sweeps: int,
                  n_bootstrap: int, noise: float = 0.5, seed: int = 0, weights: str = "seeds") -> dict:
    """Coverage on the preset's grid with `runs` pretraining runs per condition (see the module docstring)."""
    rng = np.random.default_rng(seed)
    stats: dict = {}
    for i in range(sweeps):
        ref, cand, *others = simulate_runs(rng, shape, factor, runs, noise, run_noise, paired)
        res = compare(ref, cand, True, n_bootstrap=n_bootstrap, seed=i, targets=(1.0, 0.95), pool=others,
                      weights=weights)
        _score(res, factor, stats)
    return _summary(stats)


def seed_rows(args, t0: float) -> list[dict]:
    rows = []
    for noise in args.noise:
        for shape in ("rising", "flattening"):
            for factor in (2.0, 4.0, 10.0):
                for seeds, weights in itertools.product(args.seeds if noise == args.noise[0] else [3], args.weights):
                    cell = run_cell(shape, factor, seeds, noise, args.sweeps, args.bootstrap, fit=args.fit,
                                    weights=weights)
                    rows += [{"table": "seeds", "noise": noise, "shape": shape, "factor": factor, "seeds": seeds,
                              "runs": 1, "weights": weights, "level": level, **r} for level, r in cell.items()]
                    _progress(t0, f"noise {noise} {shape} k={factor:g} n={seeds} {weights}", cell)
    return rows


def run_rows(args, t0: float) -> list[dict]:
    rows = []
    for run_noise in args.run_noise:
        for shape in ("rising", "flattening"):
            for factor in (2.0, 4.0, 10.0):
                runs_list = args.runs if run_noise == args.run_noise[0] else [3]
                for runs, paired, weights in itertools.product(runs_list, (True, False), args.weights):
                    cell = run_cell_runs(shape, factor, runs, paired, run_noise, args.run_sweeps, args.bootstrap,
                                         weights=weights)
                    rows += [{"table": "runs", "noise": 0.5, "run_noise": run_noise, "shape": shape,
                              "factor": factor, "seeds": "5 (1 at f=1)", "runs": runs, "paired": paired,
                              "weights": weights, "level": level, **r} for level, r in cell.items()]
                    _progress(t0, f"run noise {run_noise} {shape} k={factor:g} R={runs} paired={paired} {weights}",
                              cell)
    return rows


def _progress(t0: float, what: str, cell: dict) -> None:
    print(f"[{time.time() - t0:.0f} s] {what}: " + "; ".join(
        f"L{lv}: cov {r['coverage']:.2f} err {r['median_rel_error']:.3f}" for lv, r in cell.items()), flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweeps", type=int, default=100)
    ap.add_argument("--run-sweeps", type=int, default=100)
    ap.add_argument("--bootstrap", type=int, default=250)
    ap.add_argument("--fit", default="power", choices=["power", "isotonic"])
    ap.add_argument("--noise", type=float, nargs="+", default=[0.25, 1.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[2, 3, 5])
    ap.add_argument("--run-noise", type=float, nargs="+", default=[0.5, 1.0])
    ap.add_argument("--runs", type=int, nargs="+", default=[2, 3, 5])
    ap.add_argument("--weights", nargs="+", default=["seeds", "inverse-variance"],
                    choices=["seeds", "inverse-variance"])
    ap.add_argument("--skip-seed-table", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.time()
    rows = ([] if args.skip_seed_table else seed_rows(args, t0)) + run_rows(args, t0)
    path = save("factor_sim", rows, RESULTS)
    doc = json.loads(path.read_text())
    doc.update({"sweeps_per_cell": args.sweeps, "run_sweeps_per_cell": args.run_sweeps, "bootstrap": args.bootstrap,
                "fit": args.fit, "fractions": FRACTIONS, "preset_fractions": PRESET_FRACTIONS,
                "noise_parts": "1/3 common seed effect, 1/3 per-backbone seed effect, 1/3 per-trial; total std at "
                "full data = noise x slope, x f^-0.2 below", "full_score_in_slopes": FULL_SCORE,
                "seconds": round(time.time() - t0, 1)})
    write_doc("factor_sim", doc, markdown(doc))


def markdown(doc: dict) -> str:
    lines = [f"# Data-efficiency factor: simulated coverage (fit `{doc['fit']}`, {doc['bootstrap']} bootstrap draws, "
             f"{doc['seconds']} s)", "",
             f"{provenance_line(doc)}. Coverage counts an open end (censored) as covering beyond its bound; noise = "
             "per-trial std at full data in octaves of the curve's slope (the default demo's seg probe: ~0.9); "
             "level = target as a share of the reference's full-data score. Monte Carlo std of a coverage near "
             "0.95: ~0.022 at 100 sweeps.", ""]
    seeds = [r for r in doc["rows"] if r.get("table", "seeds") == "seeds"]
    runs = [r for r in doc["rows"] if r.get("table") == "runs"]
    lines += _summary_lines(doc["rows"])
    if seeds:
        lines += [f"## One pretraining run per condition: finetuning seeds only ({doc['sweeps_per_cell']} sweeps per "
                  "cell, fractions 1/64..1)", "", "| noise | shape | factor | seeds | fit weights | level | coverage "
                  "(95% CI) | median rel. error | median CI high/low | censored |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['noise']} | {r['shape']} | {r['factor']:g} | {r['seeds']} | {r['weights']} | {r['level']} | "
                  f"{r['coverage']:.2f} | {r['median_rel_error']:.3f} | {r['median_ci_ratio']:.2f} | "
                  f"{r['censored']:.2f} |" for r in seeds]
    if runs:
        lines += ["", f"## Pretraining runs, paired and pooled ({doc['run_sweeps_per_cell']} sweeps per cell, the "
                  "demo preset's grid: fractions 1/256..1, 5 seeds below 1, one exact seed at 1; seed noise 0.5)",
                  "", "| run noise | shape | factor | runs | runs share a seed effect | fit weights | level | coverage "
                  "(95% CI) | median rel. error | median CI high/low | censored |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['run_noise']} | {r['shape']} | {r['factor']:g} | {r['runs']} | "
                  f"{'yes' if r['paired'] else 'no'} | {r['weights']} | {r['level']} | {r['coverage']:.2f} | "
                  f"{r['median_rel_error']:.3f} | {r['median_ci_ratio']:.2f} | {r['censored']:.2f} |" for r in runs]
    return "\n".join(lines) + "\n"


def _summary_lines(rows: list[dict]) -> list[str]:
    """Coverage over all cells per table and fit weights: the figure the target (>= 0.90) is read from."""
    lines = ["## Summary", "", "| table | fit weights | cells | coverage min | mean | cells >= 0.90 |",
             "|---|---|---|---|---|---|"]
    for table in ("seeds", "runs"):
        for weights in ("seeds", "inverse-variance"):
            cov = [r["coverage"] for r in rows if r.get("table", "seeds") == table and r.get("weights", "seeds") ==
                   weights]
            if cov:
                lines.append(f"| {table} | {weights} | {len(cov)} | {min(cov):.2f} | {np.mean(cov):.3f} | "
                             f"{sum(c >= 0.9 for c in cov)} |")
    return lines + [""]


if __name__ == "__main__":
    main()
