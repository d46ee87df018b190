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

import numpy as np
from pydantic import Field, ValidationError

from clipdense.config import ConfigError, get_dotted
from clipdense.sweep.config import TASK_METRICS, ReportSettings
from clipdense.sweep.factor import compare, run_sd
from clipdense.sweep.grid import METRICS_FILE, TRIAL_FILE, flat_metrics
from clipdense.sweep.report_text import factor_lines, floor_lines, params_text, summary_text

SWEEP_FILE = "sweep.json"      # the sweep's resolved config, written by `clipdense sweep` beside trials/
PATH_RE = re.compile(r"^(?P<task>[^/]+)/(?P<backbone>[^/]+)/f(?P<fraction>[0-9.e+-]+)/s(?P<seed>\d+)"
                     r"(?:/(?P<hp>hp-[^/]+))?$")


class ReportConfig(ReportSettings):
    """`clipdense report`: the report settings (keys not given fall back to the sweep's `report:` section in
    sweep.json, then to ReportSettings' defaults) + where to read and write."""
    results_dir: str = Field(description="a sweep's out dir (holding trials/)")
    out_dir: str | None = Field(None, description="where to write the report; default: results_dir")
    quiet: bool = False

    def settings(self, sweep_report: dict) -> ReportSettings:
        """The sweep's settings, overridden by the keys given here."""
        given = self.model_dump(include=set(ReportSettings.model_fields) & self.model_fields_set)
        try:
            known = {k: v for k, v in (sweep_report or {}).items() if k in ReportSettings.model_fields}
            return ReportSettings.model_validate({**known, **given})
        except ValidationError as e:
            raise ConfigError(f"{SWEEP_FILE} report settings: {e.errors()[0]['loc']}: {e.errors()[0]['msg']}") from None


def find_metric(doc: dict, key: str) -> float | None:
    """`key` in a metrics.json: top level, under "metrics", a dotted path, or a unique `<prefix>/key` match."""
    for node in (doc, doc.get("metrics") if isinstance(doc.get("metrics"), dict) else None):
        if node is not None and isinstance(node.get(key), (int, float)):
            return float(node[key])
    node = get_dotted(doc, key)
    if isinstance(node, (int, float)):
        return float(node)
    hits = [v for k, v in flat_metrics(doc).items() if re.split(r"[/.]", k.lower())[-1] == key.lower()]
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
                         "condition": coords.get("condition") or coords["backbone"],
                         "schedule_by": coords.get("schedule_by"), "total_steps": coords.get("total_steps"),
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


def curves(rows: list[dict], task: str) -> dict[str, dict[float, dict[int, float]]]:
    """backbone -> fraction -> seed -> value (seeds kept: the bootstrap pairs them across fractions/backbones)."""
    out: dict[str, dict[float, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        if r["task"] == task and not r["hp"]:
            out[r["backbone"]][r["fraction"]][r["seed"]] = r["value"]
    return {bb: dict(c) for bb, c in out.items()}


def conditions(rows: list[dict], task: str, sweep: dict) -> dict[str, list[str]]:
    """condition -> its backbones (pretraining runs): from trial.json, else the sweep's backbone entries."""
    declared = {b.get("name"): b.get("condition") for b in sweep.get("backbones") or [] if isinstance(b, dict)}
    out: dict[str, set] = defaultdict(set)
    for r in rows:
        if r["task"] == task and not r["hp"]:
            cond = r["condition"] if r["condition"] != r["backbone"] else declared.get(r["backbone"])
            out[cond or r["backbone"]].add(r["backbone"])
    return {c: sorted(b, key=_natural) for c, b in sorted(out.items())}


def _natural(name: str) -> list:
    """Sort key with digit runs as numbers: run r of every condition lines up (`x-r2` before `x-r10`), which the
    bootstrap's pairing of runs by index relies on."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def plot_task(table: list[dict], task: str, path: Path, reference: str | None = None) -> None:
    from matplotlib.figure import Figure  # Agg canvas, no global pyplot state

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


def _sweep_file(root: Path) -> dict:
    try:
        return _json(root / SWEEP_FILE)
    except (OSError, ValueError):
        return {}


def _schedule_text(rows: list[dict], sweep: dict) -> str:
    kinds = sorted({r["schedule_by"] for r in rows if r.get("schedule_by")} | (
        {sweep["schedule_by"]} if sweep.get("schedule_by") else set()))
    if not kinds:
        return "iterations (not recorded: sweeps before `schedule_by` used the same steps at every fraction)"
    return " + ".join(kinds) + (" (same steps at every fraction)" if kinds == ["iterations"] else
                                " (steps scaled by the fraction)" if kinds == ["epochs"] else "")


def _protocol_text(sweep: dict) -> str:
    if sweep.get("protocol") == "fit":
        return ("fit (a ridge probe on cached frozen features, its penalty chosen inside each training subset; "
                "layers and resolution in each metrics.json)")
    return "finetune (one finetuning run per trial; frozen trunk + linear head where the task config says so)"


def write_markdown(path: Path, table, factors, rows, errors, hp_rows, settings: ReportSettings, sweep: dict,
                   missing=()) -> None:
    level = f"{100 * settings.ci:g}%"
    reference = settings.reference
    lines = ["# Data-efficiency report", "",
             f"{len(rows)} finished trials, {len(errors)} unreadable; reference: {reference or '(none)'}.", "",
             f"Finetuning schedule across fractions: {_schedule_text(rows, sweep)}.", "",
             f"Protocol: {_protocol_text(sweep)}.", ""]
    if factors:
        lines += [f"Factor = f*(reference) / f*(candidate), f* = where a {settings.fit} fit of the mean curve in "
                  "log-fraction reaches the target; target = level x the reference's fitted full-data score "
                  f"(lower-is-better metrics: (2 - level) x). {level} interval: paired Bayesian bootstrap of whole "
                  f"seed curves ({settings.bootstrap} draws; where conditions have several pretraining runs, runs are "
                  "resampled too, paired by replicate index, their variance pooled across conditions), widened by "
                  "t/z for the few seeds or runs (`clipdense/sweep/factor.py`). ≥ x: already past the "
                  "target at the smallest fraction (censored: the data bound it only from below); < x: not reached "
                  "by the largest fraction.", ""]
    for task in sorted({r["task"] for r in table}):
        t_rows = [r for r in table if r["task"] == task]
        lines += ["", f"## {task}: {t_rows[0]['metric']} ({'higher' if t_rows[0]['mode'] == 'max' else 'lower'}"
                  " is better)", "", f"![{task}]({task}.png)", "",
                  "| backbone | trunk params | fraction | n seeds | mean | std |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['backbone']} | {params_text(r['trunk_params'])} | {r['fraction']:.6g} | {r['n_seeds']} | "
                  f"{r['mean']:.4f} | {r['std']:.4f} |" for r in t_rows]
        if task in factors:
            lines += factor_lines(factors[task], level)
            lines += floor_lines(factors[task].get("floor_gains") or {})
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


def task_factors(rows: list[dict], task: str, mode: str, metric: str, settings: ReportSettings,
                 sweep: dict) -> dict | None:
    """factors.json's entry of one task: every condition against the reference condition."""
    cs, conds = curves(rows, task), conditions(rows, task, sweep)
    ref = settings.reference
    if ref is not None and ref not in conds:
        ref = next((c for c, bbs in conds.items() if ref in bbs), None)
    if ref is None:
        return None
    runs = {c: [cs[b] for b in bbs] for c, bbs in conds.items()}
    entry = {"reference": ref, "reference_runs": conds[ref], "metric": metric, "mode": mode, "backbones": {},
             "runs": {c: len(r) for c, r in runs.items()}, "run_sd": {}}
    for cond, bbs in conds.items():
        entry["run_sd"][cond] = {format(f, ".6g"): (sd if math.isfinite(sd) else None)
                                 for f, sd in run_sd(runs[cond]).items()}
        if cond == ref:
            continue
        res = compare(runs[ref], runs[cond], mode == "max", targets=settings.targets, n_bootstrap=settings.bootstrap,
                      ci=settings.ci, seed=settings.seed, fit=settings.fit,
                      pool=[r for c, r in runs.items() if c not in (ref, cond)])
        targets = [f.to_dict() for f in res["factors"]]
        deltas = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in x.items()}
                  for x in res["deltas"]]
        entry["backbones"][cond] = {**targets[0], "targets": targets, "deltas": deltas, "runs": bbs,
                                    "seeds": res["seeds"]["candidate"], "runs_paired": res["runs_paired"],
                                    "pooled_run_sd": res["pooled_run_sd"], "run_df": res["run_df"]}
        entry["target"] = targets[0]["target"]
    return entry


def floor_gains(table: list[dict], task: str, floors: list[str], conditions_of: dict[str, list[str]]) -> dict:
    """condition -> floor -> fraction -> mean(condition) - mean(floor), > 0 = better (direction-aware); a
    condition's mean pools its runs' seed means. Only the floors this task has."""
    rows = [r for r in table if r["task"] == task]
    if not rows:
        return {}
    sign = 1.0 if rows[0]["mode"] == "max" else -1.0
    means: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for cond, bbs in conditions_of.items():
        for r in rows:
            if r["backbone"] in bbs:
                means[cond][r["fraction"]].append(r["mean"])
    present = [f for f in floors if f in means]
    return {cond: {floor: {f: sign * (float(np.mean(v)) - float(np.mean(means[floor][f])))
                           for f, v in sorted(by_f.items()) if f in means[floor]} for floor in present}
            for cond, by_f in sorted(means.items()) if cond not in present and present}


def sweep_root(root: Path) -> Path:
    """The sweep's folder: `root`, or the one sweep folder directly below it (`clipdense report runs/sweep` for
    `runs/sweep/<name>`), so its trials are not mixed with other sweeps' and its settings (reference) are read."""
    if (root / SWEEP_FILE).is_file() or (root / "trials").is_dir():
        return root
    below = sorted(p.parent for p in root.glob(f"*/{SWEEP_FILE}"))
    if len(below) > 1:
        raise ConfigError(f"results_dir {root} holds {len(below)} sweeps ({', '.join(p.name for p in below)}): "
                          "name one of them")
    return below[0] if below else root


def run(cfg: ReportConfig) -> dict:
    if not Path(cfg.results_dir).is_dir():
        raise ConfigError(f"results_dir not found: {cfg.results_dir}")
    root = sweep_root(Path(cfg.results_dir))
    out = Path(cfg.out_dir) if cfg.out_dir else root
    out.mkdir(parents=True, exist_ok=True)
    sweep = _sweep_file(root)
    settings = cfg.settings(sweep.get("report") or {})

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
        plot_task(table, task, out / f"{task}.png", settings.reference)
        first = next(r for r in table if r["task"] == task)
        entry = task_factors(rows, task, first["mode"], first["metric"], settings, sweep)
        if entry is not None:
            entry["floor_gains"] = floor_gains(table, task, settings.floors, conditions(rows, task, sweep))
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
    write_markdown(out / "report.md", table, factors, rows, errors, hp_rows, settings, sweep, missing)

    summary = {"out": str(out), "trials": len(rows), "unreadable": len(errors), "missing": len(missing),
               "tasks": tasks, "schedule_by": _schedule_text(rows, sweep), "protocol": sweep.get("protocol"),
               "factors": {t: {c: summary_text(d) for c, d in e["backbones"].items()} for t, e in factors.items()}}
    if not cfg.quiet:
        print(f"report: {len(rows)} trials ({len(errors)} unreadable, {len(missing)} missing) -> {out}")
        print(f"  schedule across fractions: {summary['schedule_by']}")
        for task in tasks:
            t_rows = [r for r in table if r["task"] == task]
            print(f"  {task} [{t_rows[0]['metric']}]: {len({r['backbone'] for r in t_rows})} backbones, "
                  f"{len({r['fraction'] for r in t_rows})} fractions")
            for cond, text in summary["factors"].get(task, {}).items():
                print(f"    {cond} vs {factors[task]['reference']} ({100 * settings.ci:g}% CI): {text}")
    return summary
