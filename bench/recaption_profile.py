"""Where the recaption pipeline's CPU goes (echo engine), as shares of CPU time.

    python -m bench.recaption_profile [--shards 8] [--per-shard 500] [--image-px 320] [--view stages|processes]

Two views of the same work (bench/recaption_echo.py's shards, resized to 224):
1. stages, in one process without Ray: the CPU time per image of each step the pipeline runs (tar parse, rows to
   Arrow, decode + resize, decode_batch's own work around it, the captioner actor's call, the per-shard writer),
   beside the plain loop's (read + `prepare_image`), with cProfile's top functions of the decode stage;
2. processes, in a real run on a local Ray started for it: the CPU time of every process of that cluster (Linux
   /proc), grouped as driver, decode tasks, captioner actor and Ray's own services, and the pipeline's CPU per
   image against the plain loop's.
CPU time, not wall time, so a busy machine skews it less (caches and clocks still differ). Writes
bench/results/recaption_profile.json; the findings live in bench/results/recaption_profile.md.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.common import add_local_ray_args
from bench.jpeg_shards import make_shards
from bench.recaption_echo import pipeline
from clipdense.config import RayConfig
from clipdense.data.naming import shard_name
from clipdense.data.shards import _rows_to_table, rebatch, write_parquet
from clipdense.data.storage import Storage
from clipdense.data.tar_rows import shard_rows
from clipdense.ray_session import ray_session
from clipdense.recaption.config import EngineConfig
from clipdense.recaption.decode import ImageInput, prepare_image
from clipdense.recaption.engines.resolve import provenance
from clipdense.recaption.pipeline import CaptionActor, decode_batch
from clipdense.recaption.plan import plan_shards
from clipdense.recaption.writer import ShardAssembler

ROOT = Path(__file__).resolve().parent


def plain_cpu(paths: list[str], size: int) -> float:
    """CPU ms per image of the plain loop: read the tars + `prepare_image`, one process."""
    spec, n = ImageInput(size=size), 0
    c = time.process_time()
    for p in paths:
        with open(p, "rb") as f:
            for sample in shard_rows(f, p, "none"):
                prepare_image(sample["image_bytes"], spec)
                n += 1
    return round((time.process_time() - c) * 1e3 / n, 4)


def _tar_rows(f, path: str) -> list[dict]:
    return list(shard_rows(f, path, "none"))


def stage_profile(paths: list[str], size: int) -> dict:
    """CPU ms per image of each in-process step, and the plain loop's."""
    spec = ImageInput(size=size)
    engine = {"kind": "echo", "num_captions": 5, "batch_size": 256, "num_cpus": 0}
    actor = CaptionActor(engine)
    out = tempfile.mkdtemp()
    plan = plan_shards([(shard_name(p), p) for p in paths], Storage(out))
    assembler = ShardAssembler(plan, provenance(EngineConfig(**engine)), write=write_parquet)
    cpu: dict[str, float] = {}

    def timed(name, fn, *args):
        c = time.process_time()
        r = fn(*args)
        cpu[name] = cpu.get(name, 0.0) + time.process_time() - c
        return r

    def tables():
        for p in paths:
            with open(p, "rb") as f:
                rows = timed("tar parse", _tar_rows, f, p)
            for i in range(0, len(rows), 256):
                yield timed("rows to Arrow", _rows_to_table, rows[i:i + 256])

    with open(paths[0], "rb") as f:  # warm up: imports (ray.data's tensor type) and first-call costs
        first = _rows_to_table(list(shard_rows(f, paths[0], "none"))[:8])
    actor(decode_batch(first, spec))
    n = 0
    profile = cProfile.Profile()
    for block in rebatch(tables(), 256):
        profile.enable()
        decoded = timed("decode_batch (decode + resize + columns)", decode_batch, block, spec)
        profile.disable()
        result = timed("captioner actor call (echo)", actor, decoded)
        timed("writer (assemble + Parquet)", assembler.add, result)
        n += block.num_rows
    timed("writer (assemble + Parquet)", assembler.finish)
    shutil.rmtree(out, ignore_errors=True)
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(8)
    per = {k: round(v * 1e3 / n, 4) for k, v in cpu.items()}
    return {"images": n, "cpu_ms_per_image": per, "pipeline_steps_ms_per_image": round(sum(per.values()), 4),
            "decode_top_functions": text.getvalue()}


def _procs() -> dict[int, tuple[int, float, str, str]]:
    """pid -> (parent pid, CPU seconds, name, command line) of every process (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        name = stat[stat.index("(") + 1: stat.rindex(")")]
        f = stat[stat.rindex(")") + 2:].split()
        out[int(d)] = (int(f[1]), (int(f[11]) + int(f[12])) / tick, name, cmd)
    return out


def _tree_cpu() -> dict[int, tuple[float, str, str]]:
    """CPU seconds of this process and all its descendants (the local Ray's services and workers)."""
    procs, keep, grew = _procs(), {os.getpid()}, True
    while grew:
        grew = False
        for pid, (ppid, *_) in procs.items():
            if ppid in keep and pid not in keep:
                keep.add(pid)
                grew = True
    return {p: procs[p][1:] for p in keep if p in procs}


def _group(pid: int, name: str, cmd: str) -> str:
    if pid == os.getpid():
        return "driver (executor, writer)"
    if "CaptionActor" in name or "CaptionActor" in cmd:
        return "captioner actor"
    if cmd.startswith(("ray::IDLE", "ray::ReadTarShards")) or "decode_batch" in cmd:  # task workers' titles
        return "decode tasks (read + decode_batch)"
    return "Ray services (raylet, GCS, agents, Ray Data's actors)"


def process_profile(paths: list[str], size: int, cpus: int) -> dict:
    work = Path(tempfile.mkdtemp())
    echo = {"kind": "echo", "num_captions": 5, "batch_size": 256, "num_cpus": 0}
    try:
        with ray_session(RayConfig(num_cpus=cpus)):
            pipeline(paths[:1], work / "warmup", echo, {"size": size})
            before, t0 = _tree_cpu(), time.perf_counter()
            result = pipeline(paths, work / "out", echo, {"size": size})
            after, wall = _tree_cpu(), time.perf_counter() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)
    groups: dict[str, float] = {}
    for pid, (cpu, name, cmd) in after.items():
        g = _group(pid, name, cmd)
        groups[g] = groups.get(g, 0.0) + cpu - before.get(pid, (0.0,))[0]
    total = sum(groups.values())
    # busy: the cluster's CPU time over (wall x CPUs); below 1 on a quiet machine, cores waited (backpressure)
    return {"images": result["images"], "cpu_ms_per_image": round(total * 1e3 / result["images"], 4),
            "busy": round(total / (wall * cpus), 3),
            "shares": {g: round(v / total, 3) for g, v in sorted(groups.items(), key=lambda kv: -kv[1])}}


def main(argv=None, quick: bool = False) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--per-shard", type=int, default=500)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--view", choices=["both", "stages", "processes"], default="both")
    args = add_local_ray_args(ap, repeats=None).parse_args([] if argv is None else argv)
    if quick:
        args.shards, args.per_shard = 2, 200
    work = ROOT / "results" / "tmp" / "recaption_profile"
    paths = make_shards(work / "shards", args.shards, args.per_shard, args.image_px)
    result = {"bench": "recaption_profile", "load_avg_1m": round(os.getloadavg()[0], 2),
              "shards": args.shards, "images_per_shard": args.per_shard, "image_px": args.image_px,
              "plain_ms_per_image": plain_cpu(paths, args.size)}
    if args.view != "processes":
        result["stages"] = stage_profile(paths, args.size)
    if args.view != "stages":
        result["processes"] = process_profile(paths, args.size, args.cpus)
        result["processes"]["vs_plain"] = round(result["processes"]["cpu_ms_per_image"]
                                                / result["plain_ms_per_image"], 3)
    shutil.rmtree(work, ignore_errors=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "recaption_profile.json").write_text(json.dumps(result, indent=2))
    stages = result.pop("stages", {})
    print(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in stages.items() if k != "decode_top_functions"}, indent=2))
    print(stages.get("decode_top_functions", ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
