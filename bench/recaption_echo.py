"""Recaption pipeline overhead: the `echo` engine through Ray Data vs plain decode + resize.

    python -m bench.recaption_echo [--shards 16] [--per-shard 1000] [--image-px 320] [--coca-images 64]

Both sides read the same tar shards and run the same per-image step (`prepare_image`: decode, resize shorter
side to 224, centre crop, uint8). The ratio compares throughput per core: (pipeline images/s / cores) /
(plain images/s per core); goal >= 0.9. The plain side runs twice: one process on one core, and one process per
core over a split of the shards. The goal is judged against the all-cores run: it loads the machine as the
pipeline does (shared caches, memory bandwidth, clock), so it is the per-core rate the pipeline could reach; the
one-process figure is reported beside it. The echo actor reserves no CPU (it does no work), so the decode tasks
get every core. The default input (16 x 1000 images) amortises what a run starts (the actor pool) as a long
job does; the pipeline's time still includes it. Also reports coca-tiny (5 captions per image, seq_len 30, CPU,
one actor) through the same pipeline, twice: as initialised (vocabulary projection N(0, width^-0.5): nearly flat
logits, the nucleus is most of the vocabulary, the sampler's worst case) and with a random N(0, 2) projection
(peaked logits, as a trained model has). Writes bench/results/recaption_echo.json and .md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import shutil
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import RoundLoads, add_local_ray_args, hardware, row

ROOT = Path(__file__).resolve().parent


def synth_jpegs(n: int, px: int, seed: int = 0) -> list[bytes]:
    """`n` photo-like JPEGs of px x 0.75 px: smooth gradients + noise (photo-like JPEG sizes)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:px, 0:int(px * 0.75)]
    out = []
    for _ in range(n):
        c = rng.uniform(0, 1, 6)
        img = np.stack([(c[k] * yy + c[k + 3] * xx) % 256 for k in range(3)], -1)
        img = (img + rng.normal(0, 12, img.shape)).clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_shards(d: Path, images: list[bytes], shards: int) -> list[str]:
    """`images` split in order over `shards` tars (keys and captions by image index, whatever the split)."""
    d.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, len(images), shards + 1).astype(int)
    paths = []
    for s in range(shards):
        path = d / f"{s:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(bounds[s], bounds[s + 1]):
                for ext, data in (("jpg", images[i]), ("txt", f"image {i}".encode())):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths


def make_shards(d: Path, shards: int, per_shard: int, px: int) -> list[str]:
    return write_shards(d, synth_jpegs(shards * per_shard, px), shards)


def plain_decode(paths: list[str], size: int) -> dict:
    from clipdense.data.shards import read_shard_local
    from clipdense.data.storage import Storage
    from clipdense.recaption.decode import ImageInput, prepare_image

    spec = ImageInput(size=size)
    t0, c0, n = time.perf_counter(), time.process_time(), 0
    for p in paths:
        for row in read_shard_local(Storage(p), validate="none"):
            prepare_image(row["image_bytes"], spec)
            n += 1
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"images": n, "seconds": round(wall, 3), "cpu_seconds": round(cpu, 3), "images_per_s": round(n / wall, 1)}


def _plain_worker(args: tuple[list[str], int]) -> dict:
    return plain_decode(*args)


def plain_decode_pool(paths: list[str], size: int, procs: int) -> dict:
    """`plain_decode` in one process per core, shards split between them: the machine loaded as the pipeline
    loads it. images_per_s is the total; per_core divides it by `procs`."""
    import multiprocessing as mp

    procs = min(procs, len(paths))
    parts = [(paths[i::procs], size) for i in range(procs)]
    with mp.get_context("spawn").Pool(procs) as pool:
        pool.map(_plain_worker, [([p[0][0]], size) for p in parts])  # start and import once
        t0 = time.perf_counter()
        results = pool.map(_plain_worker, parts)
        wall = time.perf_counter() - t0
    n = sum(r["images"] for r in results)
    return {"images": n, "seconds": round(wall, 3), "processes": procs, "images_per_s": round(n / wall, 1),
            "per_core": round(n / wall / procs, 1)}


def pipeline(paths: list[str], out: Path, engine: dict, decode: dict) -> dict:
    from clipdense.config import build_config
    from clipdense.recaption import RecaptionConfig, run

    shutil.rmtree(out, ignore_errors=True)
    cfg = build_config(RecaptionConfig, {"input": paths, "output": str(out), "engine": engine, "decode": decode,
                                         "stats": {"enabled": False}})
    s = run(cfg)
    return {"images": s["rows_in"], "captioned": s["rows_captioned"], "seconds": s["seconds"],
            "images_per_s": s["images_per_s"]}


def peaked_coca(work: Path) -> str:
    """A coca-tiny checkpoint whose vocabulary projection is N(0, 2): peaked next-token distributions."""
    import torch

    from clipdense.models.registry import create_clip

    torch.manual_seed(0)
    model = create_clip("coca-tiny")
    torch.nn.init.normal_(model.text_decoder.text_projection, std=2.0)
    path = work / "coca-tiny-peaked.pt"
    torch.save(model.state_dict(), path)
    return str(path)


def main(argv=None, quick: bool = False) -> int:
    """`argv` None = defaults (as `python -m bench.run` calls it); `quick` shrinks the inputs for a smoke run."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--per-shard", type=int, default=1000)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--coca-images", type=int, default=64)
    args = add_local_ray_args(ap, repeats=2).parse_args([] if argv is None else argv)
    if quick:
        args.shards, args.per_shard, args.coca_images, args.repeats = 2, 200, 16, 1

    from clipdense.config import RayConfig
    from clipdense.ray_session import ray_session

    work = ROOT / "results" / "tmp" / "recaption_echo"
    paths = make_shards(work / "shards", args.shards, args.per_shard, args.image_px)
    with ray_session(RayConfig(num_cpus=args.cpus)):
        echo = {"kind": "echo", "num_captions": 5, "batch_size": 256, "num_cpus": 0}
        decode = {"size": args.size}  # batch_size None: read + decode fused in one task
        pipeline(paths[:1], work / "warmup", echo, decode)  # start workers once; measure steady state
        plains, pools, pipes = [], [], []
        loads = RoundLoads(quick=quick)
        for _ in range(args.repeats):  # alternate the three, each after the machine cooled down; keep each's best
            loads.start_round()
            plains.append(plain_decode(paths, args.size))
            loads.start_round()
            pools.append(plain_decode_pool(paths, args.size, args.cpus))
            loads.start_round()
            pipes.append(pipeline(paths, work / "echo", echo, decode))
        plain = max(plains, key=lambda r: r["images_per_s"])
        pooled = max(pools, key=lambda r: r["images_per_s"])
        piped = max(pipes, key=lambda r: r["images_per_s"])
        ratio = piped["images_per_s"] / args.cpus / pooled["per_core"]
        ratio_one = piped["images_per_s"] / args.cpus / plain["images_per_s"]
        coca_paths = make_shards(work / "coca_shards", 1, args.coca_images, args.image_px)
        coca_engine = {"kind": "coca", "model": "coca-tiny", "device": "cpu", "batch_size": 32, "num_cpus": 1}
        coca = {"as_initialised": pipeline(coca_paths, work / "coca", coca_engine, {}),
                "peaked_logits": pipeline(coca_paths, work / "coca", {**coca_engine,
                                                                      "checkpoint": peaked_coca(work)}, {})}
    result = {
        "bench": "recaption_echo", "cpus": args.cpus, "machine": platform.platform(),
        "load_avg_1m": round(os.getloadavg()[0], 2), **loads.summary(), "shards": args.shards, "images_per_shard": args.per_shard,
        "image_px": [args.image_px, int(args.image_px * 0.75)], "resize_to": args.size,
        "plain_decode_one_process": plain, "plain_decode_all_cores": pooled, "echo_pipeline": piped,
        "all_runs": {"plain": plains, "plain_all_cores": pools, "echo_pipeline": pipes},
        "per_core_ratio": round(ratio, 3), "per_core_ratio_vs_one_process": round(ratio_one, 3), "goal_ratio": 0.9,
        "coca_tiny_cpu_pipeline": coca,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # the harness's common row format (bench/common.py), beside this bench's own detail
    note = f"{args.shards}x{args.per_shard} JPEGs {args.image_px}px -> {args.size}; best of runs; {loads.note()}"
    rows = [row("recaption", "echo pipeline images/s per core", piped["images_per_s"] / args.cpus,
                pooled["per_core"], f"plain PIL decode+resize, {args.cpus} processes", "images/s/core", notes=note, rounds=loads),
            *[row("recaption", f"coca-tiny {k.replace('_', ' ')} images/s", v["images_per_s"], None, "", "images/s",
                  notes="5 captions per image, seq_len 30, CPU, one actor") for k, v in coca.items()]]
    result = {"name": "recaption_echo", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "hardware": hardware(), "rows": rows, **result}
    (out / "recaption_echo.json").write_text(json.dumps(result, indent=2))
    md = [
        "# Recaption pipeline overhead (echo engine)", "",
        f"Machine: {args.cpus} CPU(s) for Ray, 1-minute load average at the end {result['load_avg_1m']} "
        "(a shared machine: other jobs compete for the same cores).",
        f"Data: {args.shards} tar shards x {args.per_shard} JPEGs of {args.image_px}x{int(args.image_px * .75)}, "
        f"resized + centre-cropped to {args.size}.", "",
        "| run | images | seconds | images/s |", "|---|---|---|---|",
        f"| plain decode+resize, 1 process (best of {len(plains)}) | {plain['images']} | {plain['seconds']} | "
        f"{plain['images_per_s']} |",
        f"| plain decode+resize, {args.cpus} processes (best of {len(pools)}) | {pooled['images']} | "
        f"{pooled['seconds']} | {pooled['images_per_s']} ({pooled['per_core']} per core) |",
        f"| Ray Data pipeline, echo engine, {args.cpus} CPUs (best of {len(pipes)}) | {piped['images']} | "
        f"{piped['seconds']} | "
        f"{piped['images_per_s']} |",
        *[f"| Ray Data pipeline, coca-tiny {k.replace('_', ' ')} (5 captions, CPU, 1 actor) | {v['images']} | "
          f"{v['seconds']} | {v['images_per_s']} |" for k, v in coca.items()], "",
        f"Per-core ratio (pipeline images/s / {args.cpus} CPUs) / (plain images/s per core, {args.cpus} processes): "
        f"**{ratio:.2f}** (goal >= 0.9); against one plain process on an otherwise idle machine: {ratio_one:.2f}.",
        "All runs (images/s): plain 1 process " + ", ".join(str(r["images_per_s"]) for r in plains)
        + f"; plain {args.cpus} processes " + ", ".join(str(r["images_per_s"]) for r in pools) + "; pipeline "
        + ", ".join(str(r["images_per_s"]) for r in pipes) + ".",
    ]
    (out / "recaption_echo.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
