"""`clipdense report RESULTS_DIR`: curves, tables and data-efficiency factors from a sweep's trial directories.

Reads only `<results>/trials/**/metrics.json` (+ the `trial.json` beside each; coordinates fall back to the path
`<task>/<backbone>/f<fraction>/s<seed>[/hp-...]`), so it can be rerun anywhere the directory is copied. Writes
`report.md`, `report.csv` (task, backbone, fraction, n_seeds, mean, std), `factors.json`, `<task>.png` and, for
hyperparameter sweeps, `hparams.csv`. Unreadable trials are counted and listed, never dropped silently.
"""
from __future__ import annotations

import csv
import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from clipdense.config import Config
from clipdense.errors import ConfigError
from clipdense.sweep.config import TASK_METRICS
from clipdense.sweep.factor import efficiency_factor, fraction_deltas, full_data_target
from clipdense.sweep.grid import METRICS_FILE, TRIAL_FILE

SWEEP_FILE = "sweep.json"      # the sweep's resolved config, written by `clipdense sweep` beside trials/
PATH_RE = re.compile(r"^(?P<task>[^/]+)/(?P<backbone>[^/]+)/f(?P<fraction>[0-9.e+-]+)/s(?P<seed>\d+)"
                     r"(?:/(?P<hp>hp-[^/]+))?$")


class ReportConfig(Config):
    results_dir: str = Field(description="a sweep's out dir (holding trials/)")
    out_dir: str | None = Field(None, description="where to write the report; default: results_dir")
    reference: str | None = Field(None, description="reference backbone; default: the sweep's report.reference")
    bootstrap: int | None = Field(None, ge=0, description="bootstrap samples; default: the sweep's, else 1000")
    ci: float | None = Field(None, gt=0, lt=1)
    seed: int | None = None
    quiet: bool = False


def find_metric(doc: dict, key: str) -> float | None:
    """`key` in a metrics.json: top level, under "metrics", a dotted path, or a unique `<prefix>/key` match."""
    for node in (doc, doc.get("metrics") if isinstance(doc.get("metrics"), dict) else None):
        if node is not None and isinstance(node.get(key), (int, float)):
            return float(node[key])
    node: Any = doc
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, (int, float)):
        return float(node)
    flat = {}

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict) and k not in ("config", "backbone", "provenance"):
                walk(v, f"{prefix}{k}/")
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                flat[f"{prefix}{k}"] = float(v)
    walk(doc, "")
    hits = [v for k, v in flat.items() if re.split(r"[/.]", k.lower())[-1] == key.lower()]
    return hits[0] if len(hits) == 1 else None


def _json(path: Path) -> dict:
    doc = json.loads(path.read_text())
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    return doc


def collect(results_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """(rows, errors): one row per finished trial: task, backbone, fraction, seed, hp, hparams, metric, mode, value."""
    root = Path(results_dir)
    trials_root = root / "trials" if (root / "trials").is_dir() else root
    rows, errors = [], []
    for mpath in sorted(trials_root.rglob(METRICS_FILE)):
        rel = mpath.parent.relative_to(trials_root).as_posix()
        try:
            coords: dict = {}
            tpath = mpath.parent / TRIAL_FILE
            if tpath.is_file():
                coords = _json(tpath)
            else:
                m = PATH_RE.match(rel)
                if m is None:
                    raise ValueError(f"no {TRIAL_FILE} and the path is not <task>/<backbone>/f<fraction>/s<seed>")
                coords = {"task": m["task"], "backbone": m["backbone"], "fraction": float(m["fraction"]),
                          "seed": int(m["seed"]), "hp": m["hp"]}
            task = coords["task"]
            metric, mode = coords.get("metric"), coords.get("mode")
            if metric is None or mode is None:
                metric, mode = TASK_METRICS.get(task, (None, None))
            if metric is None:
                raise ValueError(f"unknown task {task!r} and no metric in {TRIAL_FILE}")
            doc = _json(mpath)
            value = find_metric(doc, metric)
            if value is None or not math.isfinite(value):
                raise ValueError(f"metric {metric!r} missing or not finite")
            rows.append({"task": task, "backbone": coords["backbone"], "fraction": float(coords["fraction"]),
                         "seed": int(coords["seed"]), "hp": coords.get("hp"), "hparams": coords.get("hparams") or {},
                         "metric": metric, "mode": mode, "value": value, "dir": rel,
                         "trunk_params": (doc.get("backbone") or {}).get("params")})  # trunk only, no neck
        except (ValueError, KeyError, TypeError, OSError) as e:
            errors.append({"dir": rel, "error": f"{type(e).__name__}: {e}".splitlines()[0]})
    return rows, errors


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean and std (ddof=1; 0 for a single seed) over seeds per (task, backbone, fraction); hp trials excluded."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    meta: dict[str, tuple[str, str]] = {}
    params: dict[str, int] = {}
    for r in rows:
        if r["hp"]:
            continue
        groups[(r["task"], r["backbone"], r["fraction"])].append(r["value"])
        if isinstance(r.get("trunk_params"), int):
            params.setdefault(r["backbone"], r["trunk_params"])
        meta[r["task"]] = (r["metric"], r["mode"])
    table = []
    for (task, bb, f), vals in sorted(groups.items()):
        v = np.asarray(vals, dtype=float)
        table.append({"task": task, "backbone": bb, "fraction": f, "n_seeds": len(v), "mean": float(v.mean()),
                      "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                      "metric": meta[task][0], "mode": meta[task][1], "trunk_params": params.get(bb)})
    return table


def curves(rows: list[dict], task: str) -> dict[str, dict[float, list[float]]]:
    out: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["task"] == task and not r["hp"]:
            out[r["backbone"]][r["fraction"]].append(r["value"])
    return {bb: dict(c) for bb, c in out.items()}


def plot_task(table: list[dict], task: str, path: Path, reference: str | None = None) -> None:
    from matplotlib.figure import Figure      # Agg canvas, no global pyplot state

    rows = [r for r in table if r["task"] == task]
    metric, mode = rows[0]["metric"], rows[0]["mode"]
    fig = Figure(figsize=(6.4, 4.4), dpi=100)
    ax = fig.subplots()
    for bb in sorted({r["backbone"] for r in rows}):
        pts = sorted((r["fraction"], r["mean"], r["std"]) for r in rows if r["backbone"] == bb)
        f, m, s = (np.asarray(x) for x in zip(*pts))
        line = ax.errorbar(f, m, yerr=s, marker="o", capsize=3, label=bb)
        ax.fill_between(f, m - s, m + s, alpha=0.15, color=line[0].get_color())
        if bb == reference and any(math.isclose(x, 1.0) for x in f):
            ax.axhline(m[np.isclose(f, 1.0)][0], ls="--", lw=0.8, color=line[0].get_color())
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r["fraction"] for r in rows}))
    ax.set_xticklabels([("1" if f >= 1 else f"1/{1 / f:.3g}") for f in sorted({r["fraction"] for r in rows})])
    ax.set_xlabel("fraction of finetuning data")
    ax.set_ylabel(f"{metric} ({'higher' if mode == 'max' else 'lower'} is better)")
    ax.set_title(f"{task}: {metric} vs data (mean ± std over seeds)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")


def _fmt(x: float | None, nd: int = 4) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}g}"


def _sweep_file(root: Path) -> dict:
    try:
        return _json(root / SWEEP_FILE)
    except (OSError, ValueError):
        return {}


def _factor_text(d: dict) -> str:
    wins = d.get("deltas")
    better = f"; better at {sum(x['delta'] > 0 for x in wins)}/{len(wins)} fractions" if wins else ""
    if not d["reached"]:
        return "not reached" + better
    bound = "≥ " if d["censored"] else ""
    ref = d.get("reference_fraction") or 1.0
    ref_text = f", reference reaches at {_fmt(ref, 3)}" if ref < 1.0 else ""
    return f"{bound}{_fmt(d['factor'], 3)}x (f*={_fmt(d['fraction'], 3)}{ref_text}){better}"


def _params_text(n: int | None) -> str:
    """A trunk's parameter count (metrics.json `backbone.params`, the neck not counted), e.g. 86.2M."""
    return "?" if n is None else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def write_markdown(path: Path, table, factors, rows, errors, hp_rows, reference, missing=()) -> None:
    lines = ["# Data-efficiency report", ""]
    lines.append(f"{len(rows)} finished trials, {len(errors)} unreadable; reference backbone: {reference or '(none)'}.")
    for task in sorted({r["task"] for r in table}):
        t_rows = [r for r in table if r["task"] == task]
        lines += ["", f"## {task}: {t_rows[0]['metric']} ({'higher' if t_rows[0]['mode'] == 'max' else 'lower'}"
                  " is better)", "", f"![{task}]({task}.png)", "",
                  "| backbone | trunk params | fraction | n seeds | mean | std |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['backbone']} | {_params_text(r['trunk_params'])} | {r['fraction']:.6g} | {r['n_seeds']} | "
                  f"{r['mean']:.4f} | {r['std']:.4f} |" for r in t_rows]
        if task in factors:
            lines += ["", f"Data-efficiency factor vs `{reference}` (full-data {t_rows[0]['metric']} = "
                      f"{_fmt(factors[task]['target'])}):", "",
                      "| backbone | factor | 95% CI | bootstrap not reached | mean - reference per fraction "
                      "(> 0: better) |", "|---|---|---|---|---|"]
            for bb, d in sorted(factors[task]["backbones"].items()):
                deltas = ", ".join(f"{x['fraction']:.4g}: {x['delta']:+.4f}" for x in d.get("deltas", []))
                lines.append(f"| {bb} | {_factor_text(d)} | [{_fmt(d['ci_low'], 3)}, {_fmt(d['ci_high'], 3)}] | "
                             f"{_fmt(d['not_reached_frac'], 3)} | {deltas} |")
    if hp_rows:
        lines += ["", "## Hyperparameter trials (best first per task/backbone/fraction)", "",
                  "| task | backbone | fraction | seed | value | hparams |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['task']} | {r['backbone']} | {r['fraction']:.6g} | {r['seed']} | {r['value']:.4f} | "
                  f"`{json.dumps(r['hparams'], sort_keys=True)}` |" for r in hp_rows]
    if errors:
        lines += ["", "## Unreadable trials", ""] + [f"- `{e['dir']}`: {e['error']}" for e in errors]
    if missing:
        lines += ["", f"## Trials of the sweep without results ({len(missing)})", ""] + [f"- `{n}`" for n in missing]
    path.write_text("\n".join(lines) + "\n")


def run(cfg: ReportConfig) -> dict:
    root = Path(cfg.results_dir)
    if not root.is_dir():
        raise ConfigError(f"results_dir not found: {root}")
    out = Path(cfg.out_dir) if cfg.out_dir else root
    out.mkdir(parents=True, exist_ok=True)
    sweep = _sweep_file(root)
    settings = sweep.get("report") or {}
    reference = cfg.reference or settings.get("reference")
    n_boot = cfg.bootstrap if cfg.bootstrap is not None else settings.get("bootstrap", 1000)
    ci = cfg.ci or settings.get("ci", 0.95)
    seed = cfg.seed if cfg.seed is not None else settings.get("seed", 0)

    rows, errors = collect(root)
    found = {r["dir"] for r in rows} | {e["dir"] for e in errors}
    missing = [n for n in sweep.get("trial_names", []) if n not in found and not sweep.get("search_space")]
    table = aggregate(rows)
    with open(out / "report.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["task", "backbone", "fraction", "n_seeds", "mean", "std", "metric", "mode",
                                            "trunk_params"])
        w.writeheader()
        w.writerows(table)

    factors: dict[str, dict] = {}
    tasks = sorted({r["task"] for r in table})
    for task in tasks:
        plot_task(table, task, out / f"{task}.png", reference)
        cs = curves(rows, task)
        if reference is None or reference not in cs:
            continue
        mode = next(r["mode"] for r in table if r["task"] == task)
        entry = {"reference": reference, "metric": next(r["metric"] for r in table if r["task"] == task),
                 "mode": mode, "target": full_data_target(cs[reference]), "backbones": {}}
        for bb, curve in sorted(cs.items()):
            if bb != reference:
                f = efficiency_factor(cs[reference], curve, mode == "max", n_bootstrap=n_boot, ci=ci, seed=seed)
                entry["backbones"][bb] = {**f.to_dict(),
                                          "deltas": fraction_deltas(cs[reference], curve, mode == "max")}
        factors[task] = entry
    (out / "factors.json").write_text(json.dumps(factors, indent=2) + "\n")

    hp_rows = [r for r in rows if r["hp"]]
    hp_rows.sort(key=lambda r: (r["task"], r["backbone"], r["fraction"],
                                -r["value"] if r["mode"] == "max" else r["value"]))
    if hp_rows:
        with open(out / "hparams.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["task", "backbone", "fraction", "seed", "hp", "hparams", "metric", "value"])
            for r in hp_rows:
                w.writerow([r["task"], r["backbone"], r["fraction"], r["seed"], r["hp"],
                            json.dumps(r["hparams"], sort_keys=True), r["metric"], r["value"]])
    write_markdown(out / "report.md", table, factors, rows, errors, hp_rows, reference, missing)

    summary = {"out": str(out), "trials": len(rows), "unreadable": len(errors), "missing": len(missing),
               "tasks": tasks,
               "factors": {t: {bb: _factor_text(d) for bb, d in e["backbones"].items()} for t, e in factors.items()}}
    if not cfg.quiet:
        print(f"report: {len(rows)} trials ({len(errors)} unreadable, {len(missing)} missing) -> {out}")
        for task in tasks:
            t_rows = [r for r in table if r["task"] == task]
            print(f"  {task} [{t_rows[0]['metric']}]: {len({r['backbone'] for r in t_rows})} backbones, "
                  f"{len({r['fraction'] for r in t_rows})} fractions")
            for bb, text in summary["factors"].get(task, {}).items():
                print(f"    {bb} vs {reference}: {text}")
    return summary
