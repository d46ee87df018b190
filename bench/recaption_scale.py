"""Recaption at many shards: the same images split into 16, 100, 500 and 1,000 tar shards, echo engine.

    python -m bench.recaption_scale [--images 16000] [--shards 100 500 1000] [--image-px 320] [--repeats 2]

Each run is a fresh driver process joined to one local Ray cluster (started once, so every run finds warm
workers), which reports its peak anonymous RSS (RssAnon, sampled every 20 ms; `ru_maxrss` would count the
object store pages ray.init maps) and the wall time of the whole `recaption.run` (listing,
planning, the pipeline, one Parquet per shard). Figures: the driver's peak RSS at N shards vs at 16 (goal: flat,
ratio >= 0.9) and images/s per core at N shards vs at 16 (goal: within 10%, ratio >= 0.9). The layouts alternate
within each round, each after the machine cooled down; each keeps its best throughput and its largest RSS.
Writes bench/results/recaption_scale.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import ray

from bench.common import RoundLoads, add_local_ray_args, row, write_report
from bench.jpeg_shards import synth_jpegs, write_shards
from clipdense.config import RayConfig
from clipdense.ray_session import ray_session

ROOT = Path(__file__).resolve().parent
BASE_SHARDS = 16

# The measured driver: joins the bench's cluster, runs the stage, prints one JSON line.
DRIVER = """
import json, resource, sys, time
import ray
from clipdense.config import build_config
from clipdense.recaption import RecaptionConfig, run
spec = json.loads(sys.argv[1])
import threading
def anon_kib():  # RssAnon: the driver's own memory (ru_maxrss also counts the object store pages ray.init maps)
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
ray.init(address=spec.pop("address"), log_to_driver=False)
base = peak = anon_kib()
done = threading.Event()
def sample():
    global peak
    while not done.wait(0.02):
        peak = max(peak, anon_kib())
threading.Thread(target=sample, daemon=True).start()
t0, c0 = time.perf_counter(), time.process_time()
s = run(build_config(RecaptionConfig, spec))
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
done.set()
peak = max(peak, anon_kib())
print("RESULT " + json.dumps({"rows": s["rows_in"], "written": s["shards"]["written"], "seconds": wall,
                              "driver_cpu_s": cpu, "base_rss_mib": base / 1024, "peak_rss_mib": peak / 1024}))
"""


def run_driver(address: str, paths: list[str], out: Path, batch_size: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    spec = {"address": address, "input": paths, "output": str(out), "stats": {"enabled": False},
            "engine": {"kind": "echo", "num_captions": 5, "batch_size": batch_size, "num_cpus": 0}}
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(spec)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"recaption driver failed ({proc.returncode}): {proc.stderr[-2000:]}")
    r = json.loads(line[len("RESULT "):])
    if r["written"] != len(paths):
        raise RuntimeError(f"{r['written']} of {len(paths)} shard files written")
    return r


def main(argv=None, quick: bool = False) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=16_000)
    ap.add_argument("--shards", type=int, nargs="+", default=[100, 500, 1000])
    args = add_local_ray_args(ap, repeats=2).parse_args([] if argv is None else argv)
    if quick:
        args.images, args.shards, args.image_px, args.repeats = 800, [100, 200], 160, 1

    work = ROOT / "results" / "tmp" / "recaption_scale"
    shutil.rmtree(work, ignore_errors=True)
    images = synth_jpegs(args.images, args.image_px)
    layouts = [BASE_SHARDS, *args.shards]
    paths = {n: write_shards(work / f"in_{n}", images, n) for n in layouts}
    try:
        with ray_session(RayConfig(num_cpus=args.cpus)):
            address = ray.get_runtime_context().gcs_address
            run_driver(address, paths[BASE_SHARDS][:1], work / "warmup", 256)  # start the workers once
            runs: dict[int, list[dict]] = {n: [] for n in layouts}
            loads = RoundLoads(quick=quick)
            for _ in range(args.repeats):
                for n in layouts:
                    loads.start_round()
                    runs[n].append(run_driver(address, paths[n], work / f"out_{n}", 256))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    best = {n: max(r["rows"] / r["seconds"] / args.cpus for r in rs) for n, rs in runs.items()}
    rss = {n: max(r["peak_rss_mib"] for r in rs) for n, rs in runs.items()}
    note = (f"{args.images} JPEGs {args.image_px}px, echo engine, {args.cpus} CPUs; the driver's peak RSS; "
            f"{loads.note()}")
    rows = []
    for n in args.shards:
        per = args.images // n
        rows.append(row("recaption", f"driver peak RSS at {n} shards ({per} images each)", rss[n], rss[BASE_SHARDS],
                        f"{BASE_SHARDS} shards, same images", "MiB", higher_is_better=False, notes=note,
                        rounds=loads))
        rows.append(row("recaption", f"images/s per core at {n} shards ({per} images each)", best[n],
                        best[BASE_SHARDS], f"{BASE_SHARDS} shards, same images", "images/s/core",
                        notes=note, rounds=loads))
    out = Path(args.out)
    md = write_report("recaption_scale", "Recaption at many shards (echo engine)", __doc__, rows, out)
    detail = json.loads((out / "recaption_scale.json").read_text())
    detail["runs"] = {str(n): rs for n, rs in runs.items()}
    (out / "recaption_scale.json").write_text(json.dumps(detail, indent=2))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
