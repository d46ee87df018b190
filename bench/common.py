"""Shared bench plumbing: every benchmark returns rows {bench, metric, ours, peer, peer_name, ratio, unit, notes}
measured in the same run; `save` writes bench/results/<name>.json and the run writes one markdown table."""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def hardware() -> str:
    try:
        import torch
        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPU cores"
    except Exception:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores (no GPU)"


def row(bench: str, metric: str, ours: float, peer: float | None, peer_name: str, unit: str,
        higher_is_better: bool = True, notes: str = "") -> dict:
    ratio = None
    if peer:
        ratio = ours / peer if higher_is_better else peer / ours
    return {"bench": bench, "metric": metric, "ours": round(ours, 4), "peer": None if peer is None else round(peer, 4),
            "peer_name": peer_name, "ratio": None if ratio is None else round(ratio, 3), "unit": unit, "notes": notes}


def save(name: str, rows: list[dict], out_dir: Path = RESULTS) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"name": name, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "hardware": hardware(), "rows": rows}
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


def markdown(payloads: list[dict]) -> str:
    lines = ["| bench | metric | ours | peer | ratio (ours vs peer) | unit | hardware | date |",
             "|---|---|---:|---:|---:|---|---|---|"]
    for p in payloads:
        for r in p["rows"]:
            peer = "" if r["peer"] is None else f"{r['peer']} ({r['peer_name']})"
            ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}x"
            lines.append(f"| {r['bench']} | {r['metric']} | {r['ours']} | {peer} | {ratio} | {r['unit']} | "
                         f"{p['hardware']} | {p['date'][:10]} |")
    return "\n".join(lines) + "\n"


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
