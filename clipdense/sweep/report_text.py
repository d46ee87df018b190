"""The report's text: factors, intervals and the per-task markdown tables (sweep/report.py assembles them)."""
from __future__ import annotations

import math


def fmt(x: float | None, nd: int = 4) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}g}"


def factor_text(d: dict) -> str:
    """One target's factor: `3.1x`, `>= 16x` (censored), `< 1x (not reached)`."""
    if d.get("factor") is None:
        return "n/a"
    if not d["reached"]:
        return f"< {fmt(d['factor'], 3)}x (not reached)"
    return f"{'≥ ' if d['censored'] else ''}{fmt(d['factor'], 3)}x"


def params_text(n: int | None) -> str:
    """A trunk's parameter count (metrics.json `backbone.params`, the neck not counted), e.g. 86.2M."""
    return "?" if n is None else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def interval_text(d: dict) -> str:
    if d.get("ci_low") is None or d.get("ci_high") is None:
        return "n/a"
    if math.isclose(d["ci_low"], d["ci_high"]) and (d["ci_low_open"] or d["ci_high_open"]):
        return ("< " if d["ci_low_open"] else "≥ ") + fmt(d["ci_high"], 3)     # one-sided: a bound only
    low = ("< " if d["ci_low_open"] else "") + fmt(d["ci_low"], 3)
    high = ("≥ " if d["ci_high_open"] else "") + fmt(d["ci_high"], 3)
    return f"[{low}, {high}]"


def summary_text(entry: dict) -> str:
    """All targets of one candidate, for the console: `3.1x [1.2, 6.0] at 100%; ...; better at 3/3 fractions`."""
    parts = [f"{factor_text(d)} {interval_text(d)} at {100 * d['level']:g}%" for d in entry["targets"]]
    wins = entry.get("deltas") or []
    better = f"; better at {sum(x['delta'] > 0 for x in wins)}/{len(wins)} fractions" if wins else ""
    return "; ".join(parts) + better


def factor_lines(e: dict, level: str) -> list[str]:
    """One task's factor table, per-fraction deltas and pretraining-run SDs."""
    lines = ["", f"Data-efficiency factor vs `{e['reference']}` ({runs_text(e['reference_runs'])}):", "",
             f"| condition | target | factor | {level} CI | f* candidate / reference | draws censored / "
             "not reached |", "|---|---|---|---|---|---|"]
    for cond, c in sorted(e["backbones"].items()):
        for d in c["targets"]:
            lines.append(f"| {cond} | {100 * d['level']:g}% = {fmt(d['target'])} | {factor_text(d)} | "
                         f"{interval_text(d)} | {fmt(d['fraction'], 3)} / {fmt(d['reference_fraction'], 3)}"
                         f" | {fmt(d['censored_frac'], 2)} / {fmt(d['not_reached_frac'], 2)} |")
    lines += ["", f"Per fraction: mean(condition) - mean(reference), > 0 = better, with its {level} CI:", "",
              "| condition | runs | fraction | delta | CI |", "|---|---|---|---|---|"]
    for cond, c in sorted(e["backbones"].items()):
        for x in c["deltas"]:
            ci = (f"[{x['ci_low']:+.4f}, {x['ci_high']:+.4f}]" if x.get("ci_low") is not None
                  and x.get("ci_high") is not None else "n/a")
            lines.append(f"| {cond} | {runs_text(c['runs'])} | {x['fraction']:.4g} | {x['delta']:+.4f} | {ci} |")
    return lines + _run_sd_lines(e)


def _run_sd_lines(e: dict) -> list[str]:
    """Each condition's run SD before pooling, and per candidate the pooled SD its interval uses, per fraction."""
    sds = e.get("run_sd") or {}
    if not any(v is not None for c in sds.values() for v in c.values()):
        return []
    fractions = sorted({f for c in sds.values() for f in c}, key=float)
    lines = ["", "Pretraining-run SD: at each fraction, the SD across a condition's runs of the run's mean over "
             "its finetuning seeds (that mean's seed noise included), before pooling. Each interval uses a pooled "
             "SD: runs paired by replicate index (same run counts): the SD of the two-way residuals (replicate "
             "effect removed) over the conditions with that many runs, df = (conditions − 1)(runs − 1); "
             "otherwise the conditions' SDs pooled, df = Σ(runs − 1).", "",
             "| condition | runs | " + " | ".join(f"f={float(f):.4g}" for f in fractions) + " |",
             "|---|---|" + "---|" * len(fractions)]
    rows = [(c, str(e["runs"].get(c, "?")), sds[c]) for c in sorted(sds)]
    rows += [(f"pooled for {c} ({'paired' if x.get('runs_paired') else 'unpaired'})", f"df {x.get('run_df', 0)}",
              x.get("pooled_run_sd") or {}) for c, x in sorted(e["backbones"].items())]
    for cond, runs, sd in rows:
        lines.append(f"| {cond} | {runs} | " + " | ".join(fmt(sd.get(f), 3) if sd.get(f) is not None else "–"
                                                         for f in fractions) + " |")
    return lines


def runs_text(runs: list[str]) -> str:
    return f"{len(runs)} pretraining run{'s' if len(runs) != 1 else ''}" + (f": {', '.join(runs)}"
                                                                            if len(runs) > 1 else "")


def floor_lines(gains: dict) -> list[str]:
    if not gains:
        return []
    lines = ["", "Gain over the floors: mean(condition) - mean(floor), > 0 = better:", "",
             "| condition | floor | " + " | ".join(f"{f:.6g}" for f in _fractions(gains)) + " |",
             "|---|---|" + "---|" * len(_fractions(gains))]
    for cond, by_floor in gains.items():
        for floor, by_f in by_floor.items():
            lines.append(f"| {cond} | {floor} | " + " | ".join(fmt(by_f.get(f)) for f in _fractions(gains)) + " |")
    return lines


def _fractions(gains: dict) -> list[float]:
    return sorted({f for by_floor in gains.values() for by_f in by_floor.values() for f in by_f})
