"""Shared bench plumbing: every benchmark returns rows {bench, metric, ours, peer, peer_name, ratio, unit, notes}
measured in the same run; `save` writes bench/results/<name>.json and the run writes one markdown table."""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import time
from pathlib import Path

from clipdense.config import code_version

RESULTS = Path(__file__).resolve().parent / "results"


def add_local_ray_args(ap: argparse.ArgumentParser, repeats: int | None = 2) -> argparse.ArgumentParser:
    """The flags of the benches that caption synthetic JPEGs on a local Ray they start: `--image-px` (their long
    side), `--cpus` (of that Ray; default: this process's cores), `--repeats` (measured rounds; not added when
    None) and `--out` (where results go)."""
    ap.add_argument("--image-px", type=int, default=320)
    ap.add_argument("--cpus", type=int, default=len(os.sched_getaffinity(0)))
    if repeats is not None:
        ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--out", default=str(RESULTS))
    return ap


def parse_bench_args(prog: str, argv: list[str] | None, quick: bool = False, **defaults) -> argparse.Namespace:
    """A bench's flags: one `--name` per keyword (`per_class=60` -> `--per-class`, typed as its default) and
    `--quick`, set when given or when the caller passes `quick` (as `bench.run --quick` does)."""
    ap = argparse.ArgumentParser(prog=prog)
    for name, default in defaults.items():
        ap.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv or [])
    args.quick = args.quick or quick
    return args


def hardware() -> str:
    try:
        import torch
        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPU cores"
    except Exception:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores (no GPU)"


def row(bench: str, metric: str, ours: float | None, peer: float | None, peer_name: str, unit: str,
        higher_is_better: bool = True, notes: str = "", rounds: "RoundLoads | None" = None) -> dict:
    """One figure. `rounds` (the load before each measured round) marks it `loaded` when the machine was busy."""
    ratio = None  # > 1 means ours is better, whichever direction the metric runs
    if peer and ours:
        ratio = ours / peer if higher_is_better else peer / ours
    out = {"bench": bench, "metric": metric, "ours": None if ours is None else round(ours, 4),
           "peer": None if peer is None else round(peer, 4), "peer_name": peer_name,
           "ratio": None if ratio is None else round(ratio, 3), "unit": unit, "notes": notes}
    if rounds is not None:
        out.update(rounds.summary())
    return out


def save(name: str, rows: list[dict], out_dir: Path = RESULTS) -> Path:
    """Write <out_dir>/<name>.json: the rows with when, on what hardware and from which code version."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"name": name, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "hardware": hardware(), "code_version": code_version(), "rows": rows}
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


def provenance_line(doc: dict) -> str:
    """'<date>, <hardware>, code <commit>[ (dirty)]': where and from what code a saved result came."""
    cv = doc.get("code_version") or {}
    return f"{doc['date']}, {doc['hardware']}, code {cv.get('commit', '?')}{' (dirty)' if cv.get('dirty') else ''}"


def write_doc(name: str, doc: dict, markdown_text: str, out_dir: Path = RESULTS) -> None:
    """A bench's finished document: `<name>.json` and its `<name>.md`."""
    (out_dir / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out_dir / f"{name}.md").write_text(markdown_text)
    print(f"wrote {out_dir / (name + '.md')} in {doc['seconds']} s")


def markdown(payloads: list[dict]) -> str:
    lines = ["| bench | metric | ours | peer | ratio (ours vs peer) | unit | hardware | date | notes |",
             "|---|---|---:|---:|---:|---|---|---|---|"]
    for p in payloads:
        for r in harness_rows(p):  # files without harness rows (ad-hoc GPU checks, simulations): own layout
            ours = "" if r["ours"] is None else r["ours"]
            peer = "" if r["peer"] is None else f"{r['peer']} ({r['peer_name']})"
            ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}x"
            notes = " ".join(str(r.get("notes", "")).split()).replace("|", "/")
            if r.get("loaded"):
                notes = "LOADED machine, not a publishable figure; " + notes
            lines.append(f"| {r['bench']} | {r['metric']} | {ours} | {peer} | {ratio} | {r['unit']} | "
                         f"{p['hardware']} | {p['date'][:10]} | {notes} |")
    return "\n".join(lines) + "\n"


def harness_rows(payload: dict) -> list[dict]:
    """The rows of a payload in this harness's format (`row()`); other JSON files in results/ keep their own."""
    rows = payload.get("rows")
    return [r for r in rows if isinstance(r, dict) and "bench" in r and "metric" in r] if isinstance(rows, list) \
        else []


def latest_figures(payloads: list[dict]) -> list[dict]:
    """The payloads with each figure (bench, metric) kept from its latest run only, and a failed figure
    ("[bench] <subject> FAILED") dropped once a later run measured that subject: the table shows what holds now."""
    def failed_subject(r: dict) -> str | None:
        words = r["metric"].split()
        if not words or words[-1] != "FAILED":
            return None
        return " ".join(words[1:-1] if words[0] == r["bench"] else words[:-1])

    rows = [(p.get("date", ""), r) for p in payloads for r in harness_rows(p)]
    latest: dict[tuple[str, str], str] = {}
    for date, r in rows:
        key = (r["bench"], r["metric"])
        latest[key] = max(latest.get(key, ""), date)

    def current(date: str, r: dict) -> bool:
        if latest[(r["bench"], r["metric"])] != date:
            return False
        subject = failed_subject(r)
        return subject is None or not any(
            d > date and o["bench"] == r["bench"] and o["metric"].startswith(subject + " ") and not failed_subject(o)
            for d, o in rows)

    return [{**p, "rows": [r for r in harness_rows(p) if current(p.get("date", ""), r)]} if "rows" in p else p
            for p in payloads]


def quiet_limit(cores: int | None = None) -> float:
    """The 1-minute load average above which a round counts as loaded: 1.5 on 2 cores (0.75 per core). A busy
    box once turned a 0.92x figure into a published 1.47x: the peer's loader workers lose more to other load."""
    return 0.75 * (cores or os.cpu_count() or 1)


def wait_for_quiet(limit: float | None = None, timeout_s: float = 300.0, poll_s: float = 5.0,
                   sleep=time.sleep, loadavg=os.getloadavg) -> float:
    """Wait (up to `timeout_s`) for the 1-minute load average to fall to `limit`; return the load it ends at.
    The caller records that load: a round that had to start above the limit is marked loaded, not hidden."""
    limit = quiet_limit() if limit is None else limit
    waited = 0.0
    load = loadavg()[0]
    while load > limit and waited < timeout_s:
        if waited == 0:
            print(f"bench: load average {load:.2f} > {limit:.2f}; waiting up to {timeout_s:.0f} s for the machine "
                  "to cool down", flush=True)
        sleep(poll_s)
        waited += poll_s
        load = loadavg()[0]
    return load


class RoundLoads:
    """The load average before each measured round. Rounds start only after `wait_for_quiet`; figures from a run
    in which any round started above the limit are marked `loaded` and kept out of the published tables."""

    def __init__(self, limit: float | None = None, timeout_s: float = 300.0, quick: bool = False):
        self.limit = quiet_limit() if limit is None else limit
        self.timeout_s = 10.0 if quick else timeout_s  # a smoke run does not wait; its figures are not published
        self.loads: list[float] = []

    def start_round(self) -> float:
        load = wait_for_quiet(self.limit, self.timeout_s)
        self.loads.append(round(load, 2))
        return load

    @property
    def loaded(self) -> bool:
        return any(load > self.limit for load in self.loads)

    def summary(self) -> dict:
        return {"load_1m_before_rounds": list(self.loads), "load_limit": round(self.limit, 2),
                "loaded": self.loaded}

    def note(self) -> str:
        state = "LOADED (not for publication)" if self.loaded else "quiet"
        return f"{state}: load avg before rounds {', '.join(f'{x:.1f}' for x in self.loads)} (limit {self.limit:.1f})"


def load_note() -> str:
    """The machine's load, for the notes: a shared box's figures swing with what else runs."""
    try:
        one, five, _ = os.getloadavg()
        return f"load avg {one:.1f} (1 min) / {five:.1f} (5 min) on {os.cpu_count()} cores"
    except OSError:
        return ""


def write_report(name: str, title: str, doc: str, rows: list[dict], out_dir: Path = RESULTS) -> str:
    """Save rows as <name>.json plus <name>.md (title, the bench's docstring, the table); returns the markdown."""
    path = save(name, rows, out_dir)
    md = f"# {title}\n\n{(doc or '').strip()}\n\n" + markdown([json.loads(path.read_text())])
    path.with_suffix(".md").write_text(md)
    return md


def median_rate(values: list[float], skip_first: bool = True) -> float:
    """Median of per-interval rates, dropping the first (warm-up) when there are more than two."""
    vals = values[1:] if skip_first and len(values) > 2 else values
    if not vals:
        raise ValueError("no measurements")
    s = sorted(vals)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2
