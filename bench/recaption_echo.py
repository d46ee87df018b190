"""Recaption pipeline overhead: the `echo` engine through the pipeline vs plain decode + resize.

    python -m bench.recaption_echo [--shards 16] [--per-shard 1000] [--image-px 320] [--coca-images 64]

Both sides read the same tar shards and run the same per-image step (`prepare_image`: decode, resize shorter side to
224, centre crop, uint8). The ratio compares throughput per core: (pipeline images/s / cores) / (plain images/s per
core); goal >= 0.95. Two phases, sides alternating within each (the order reversed every other round), median of
`--repeats` (3) rounds. Without Ray: plain decode in one process, in one process per core over a split of the
shards, and the pipeline in process (`ray.in_process`: decode in one DataLoader worker per core, the captioner and
writer in the run's process). With a local Ray up: the plain per-core pool again and the Ray Data pipeline. Each
pipeline is judged against the per-core pool of its own phase: it loads the machine as the pipeline does (shared
caches, memory bandwidth, clock, and an idle Ray where there is one), so it is the per-core rate the pipeline could
reach; the one-process figure is reported beside it. The echo actor reserves no CPU (it does no
work), so the decode tasks get every core. The default input (16 x 1000 images) amortises what a run starts (the
actor pool) as a long job does; the pipeline's time still includes it. Also reports coca-tiny (5 captions per image,
seq_len 30, CPU, one actor) through the same pipeline, twice: as initialised (vocabulary projection N(0,
width^-0.5): nearly flat logits, the nucleus is most of the vocabulary, the sampler's worst case) and with a random
N(0, 2) projection (peaked logits, as a trained model has). Writes bench/results/recaption_echo.json and .md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
from pathlib import Path

import torch

from bench.common import RoundLoads, add_local_ray_args, hardware, row
from bench.jpeg_shards import make_shards
from bench.plain_decode import plain_decode, plain_decode_pool
from clipdense.config import RayConfig, build_config, code_version
from clipdense.models.registry import create_clip
from clipdense.ray_session import ray_session
from clipdense.recaption import RecaptionConfig, run

ROOT = Path(__file__).resolve().parent
ECHO = {"kind": "echo", "num_captions": 5, "batch_size": 256, "num_cpus": 0}
COCA = {"kind": "coca", "model": "coca-tiny", "device": "cpu", "batch_size": 32, "num_cpus": 1}


def pipeline(paths: list[str], out: Path, engine: dict, decode: dict, in_process: bool = False) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cfg = build_config(RecaptionConfig, {"input": paths, "output": str(out), "engine": engine, "decode": decode,
                                         "stats": {"enabled": False}, "ray": {"in_process": in_process}})
    s = run(cfg)
    return {"images": s["rows_in"], "captioned": s["rows_captioned"], "seconds": s["seconds"],
            "images_per_s": s["images_per_s"]}


def peaked_coca(work: Path) -> str:
    """A coca-tiny checkpoint whose vocabulary projection is N(0, 2): peaked next-token distributions."""
    torch.manual_seed(0)
    model = create_clip("coca-tiny")
    torch.nn.init.normal_(model.text_decoder.text_projection, std=2.0)
    path = work / "coca-tiny-peaked.pt"
    torch.save(model.state_dict(), path)
    return str(path)


def parse_args(argv: list[str] | None, quick: bool) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--per-shard", type=int, default=1000)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--coca-images", type=int, default=64)
    args = add_local_ray_args(ap, repeats=3).parse_args([] if argv is None else argv)
    if quick:
        args.shards, args.per_shard, args.coca_images, args.repeats = 2, 200, 16, 1
    return args


def local_rounds(paths: list[str], work: Path, args: argparse.Namespace, loads: RoundLoads) -> dict[str, list[dict]]:
    """The sides that need no Ray, before Ray starts (an idle Ray beside them is not what either side pays): plain
    decode in one process, in one process per core, and the pipeline in process; `args.repeats` rounds, the order
    reversed every other round so neither side always runs on a machine warmed by the other."""
    decode = {"size": args.size, "local_workers": args.cpus}
    pipeline(paths[:1], work / "warmup_local", ECHO, decode, in_process=True)  # page cache, imports
    sides = {"plain": lambda: plain_decode(paths, args.size),
             "plain_all_cores": lambda: plain_decode_pool(paths, args.size, args.cpus),
             "echo_in_process": lambda: pipeline(paths, work / "echo_local", ECHO, decode, in_process=True)}
    return _alternate(sides, args.repeats, loads)


def ray_rounds(paths: list[str], work: Path, args: argparse.Namespace, loads: RoundLoads) -> dict[str, list[dict]]:
    """The Ray Data pipeline against plain decode on every core, alternating, inside the Ray session."""
    decode = {"size": args.size}  # batch_size None: read + decode fused in one task
    pipeline(paths[:1], work / "warmup", ECHO, decode)  # start workers once; measure steady state
    sides = {"plain_all_cores_ray_up": lambda: plain_decode_pool(paths, args.size, args.cpus),
             "echo_pipeline": lambda: pipeline(paths, work / "echo", ECHO, decode)}
    return _alternate(sides, args.repeats, loads)


def _alternate(sides: dict, repeats: int, loads: RoundLoads) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    for r in range(repeats):
        for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            loads.start_round()
            runs[name].append(sides[name]())
    return runs


def coca_runs(work: Path, args: argparse.Namespace) -> dict[str, dict]:
    """coca-tiny through the pipeline, as initialised and with peaked logits."""
    paths = make_shards(work / "coca_shards", 1, args.coca_images, args.image_px)
    return {"as_initialised": pipeline(paths, work / "coca", COCA, {}),
            "peaked_logits": pipeline(paths, work / "coca", {**COCA, "checkpoint": peaked_coca(work)}, {})}


def _median(runs: list[dict]) -> dict:
    """The run with the median images/s (the lower middle of an even count)."""
    ranked = sorted(runs, key=lambda r: r["images_per_s"])
    return ranked[(len(ranked) - 1) // 2]


def summary(args: argparse.Namespace, loads: RoundLoads, runs: dict[str, list[dict]], coca: dict) -> dict:
    """This bench's own detail: the median run of each side, every run, and the per-core ratios (each pipeline
    against the plain pool of its own phase: without Ray, and with Ray up)."""
    med = {name: _median(r) for name, r in runs.items()}
    here, piped = med["echo_in_process"], med["echo_pipeline"]
    return {
        "bench": "recaption_echo", "cpus": args.cpus, "machine": platform.platform(),
        "load_avg_1m": round(os.getloadavg()[0], 2), **loads.summary(), "shards": args.shards,
        "images_per_shard": args.per_shard, "image_px": [args.image_px, int(args.image_px * 0.75)],
        "resize_to": args.size, "median_runs": med, "all_runs": runs,
        "per_core_ratio_in_process": round(here["images_per_s"] / args.cpus / med["plain_all_cores"]["per_core"], 3),
        "per_core_ratio": round(piped["images_per_s"] / args.cpus / med["plain_all_cores_ray_up"]["per_core"], 3),
        "per_core_ratio_in_process_vs_one_process": round(here["images_per_s"] / args.cpus
                                                          / med["plain"]["images_per_s"], 3),
        "goal_ratio": 0.95, "coca_tiny_cpu_pipeline": coca,
    }


def harness_rows(args: argparse.Namespace, loads: RoundLoads, result: dict) -> list[dict]:
    """The harness's common row format (bench/common.py), beside this bench's own detail."""
    med = result["median_runs"]
    note = (f"{args.shards}x{args.per_shard} JPEGs {args.image_px}px -> {args.size}; median of {args.repeats} "
            f"rounds, sides alternating; {loads.note()}")
    peer = f"plain PIL decode+resize, {args.cpus} processes"
    return [row("recaption", "echo pipeline images/s per core, in process (ray.in_process, no Ray)",
                med["echo_in_process"]["images_per_s"] / args.cpus, med["plain_all_cores"]["per_core"], peer,
                "images/s/core", notes=note + f"; decode in {args.cpus} DataLoader workers, the captioner and writer "
                "in the run's process; both sides with no Ray running", rounds=loads),
            row("recaption", "echo pipeline images/s per core, Ray Data", med["echo_pipeline"]["images_per_s"]
                / args.cpus, med["plain_all_cores_ray_up"]["per_core"], peer + " (beside the same idle Ray)",
                "images/s/core", notes=note, rounds=loads),
            *[row("recaption", f"coca-tiny {k.replace('_', ' ')} images/s", v["images_per_s"], None, "", "images/s",
                  notes="5 captions per image, seq_len 30, CPU, one actor")
              for k, v in result["coca_tiny_cpu_pipeline"].items()]]


def markdown_lines(args: argparse.Namespace, result: dict) -> list[str]:
    med, runs, n = result["median_runs"], result["all_runs"], args.repeats
    pool, pool_ray = med["plain_all_cores"], med["plain_all_cores_ray_up"]

    def line(label: str, r: dict, per_core: bool = False) -> str:
        rate = f"{r['images_per_s']} ({r['per_core']} per core)" if per_core else str(r["images_per_s"])
        return f"| {label} (median of {n}) | {r['images']} | {r['seconds']} | {rate} |"

    return [
        "# Recaption pipeline overhead (echo engine)", "",
        f"Machine: {args.cpus} CPU(s), 1-minute load average at the end {result['load_avg_1m']}; "
        f"{'LOADED: not for publication' if result['loaded'] else 'every round started quiet'} "
        f"(loads before rounds {result['load_1m_before_rounds']}, limit {result['load_limit']}).",
        f"Data: {args.shards} tar shards x {args.per_shard} JPEGs of {args.image_px}x{int(args.image_px * .75)}, "
        f"resized + centre-cropped to {args.size}. Sides alternate within each phase, the order reversed every "
        "other round.", "",
        "| run | images | seconds | images/s |", "|---|---|---|---|",
        "| **without Ray** | | | |",
        line("plain decode+resize, 1 process", med["plain"]),
        line(f"plain decode+resize, {args.cpus} processes", pool, per_core=True),
        line(f"the pipeline in process (`ray.in_process`: {args.cpus} decode workers)", med["echo_in_process"]),
        "| **with a local Ray up** | | | |",
        line(f"plain decode+resize, {args.cpus} processes", pool_ray, per_core=True),
        line(f"Ray Data pipeline, echo engine, {args.cpus} CPUs", med["echo_pipeline"]),
        *[f"| Ray Data pipeline, coca-tiny {k.replace('_', ' ')} (5 captions, CPU, 1 actor; one run) | "
          f"{v['images']} | {v['seconds']} | {v['images_per_s']} |"
          for k, v in result["coca_tiny_cpu_pipeline"].items()],
        "",
        f"Per-core ratio (pipeline images/s / {args.cpus} CPUs) / (plain images/s per core, {args.cpus} processes, "
        f"same phase): **{result['per_core_ratio_in_process']:.2f}** in process (goal >= 0.95); "
        f"**{result['per_core_ratio']:.2f}** through Ray Data; in process against one plain process on an "
        f"otherwise idle machine: {result['per_core_ratio_in_process_vs_one_process']:.2f}.",
        "All runs (images/s): " + "; ".join(f"{name} " + ", ".join(str(r["images_per_s"]) for r in rs)
                                           for name, rs in runs.items()) + ".",
    ]


def main(argv=None, quick: bool = False) -> int:
    """`argv` None = defaults (as `python -m bench.run` calls it); `quick` shrinks the inputs for a smoke run."""
    args = parse_args(argv, quick)
    work = ROOT / "results" / "tmp" / "recaption_echo"
    paths = make_shards(work / "shards", args.shards, args.per_shard, args.image_px)
    loads = RoundLoads(quick=quick)
    runs = local_rounds(paths, work, args, loads)
    with ray_session(RayConfig(num_cpus=args.cpus)):
        runs.update(ray_rounds(paths, work, args, loads))
        coca = coca_runs(work, args)
    result = summary(args, loads, runs, coca)
    result = {"name": "recaption_echo", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "hardware": hardware(), "code_version": code_version(), "rows": harness_rows(args, loads, result),
              **result}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recaption_echo.json").write_text(json.dumps(result, indent=2))
    md = markdown_lines(args, result)
    (out / "recaption_echo.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
