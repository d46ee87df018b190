"""Recaption pipeline overhead: the `echo` engine through the pipeline vs plain decode + resize.

    python -m bench.recaption_echo [--shards 16] [--per-shard 1000] [--image-px 320] [--coca-images 64]

Both sides read the same tar shards and run the same per-image step (`prepare_image`: decode, resize shorter side to
224, centre crop, uint8). The ratio compares throughput per core: (pipeline images/s / cores) / (plain images/s per
core); goal >= 0.95. The pipeline runs twice per round: through Ray Data, and in process (`ray.in_process`: decode
in one DataLoader worker per core, the captioner and writer in the run's process). The plain side runs twice: one
process on one core, and one process per core over a split of the shards. The goal is judged against the all-cores
run: it loads the machine as the pipeline does (shared caches, memory bandwidth, clock), so it is the per-core rate
the pipeline could reach; the one-process figure is reported beside it. The echo actor reserves no CPU (it does no
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
from clipdense.config import RayConfig, build_config
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
    args = add_local_ray_args(ap, repeats=2).parse_args([] if argv is None else argv)
    if quick:
        args.shards, args.per_shard, args.coca_images, args.repeats = 2, 200, 16, 1
    return args


def echo_rounds(paths: list[str], work: Path, args: argparse.Namespace, loads: RoundLoads) -> dict[str, list[dict]]:
    """Plain decode (one process; one per core) and the echo pipeline, alternating `args.repeats` times."""
    decode = {"size": args.size}  # batch_size None: read + decode fused in one task
    pipeline(paths[:1], work / "warmup", ECHO, decode)  # start workers once; measure steady state
    runs: dict[str, list[dict]] = {"plain": [], "plain_all_cores": [], "echo_pipeline": [], "echo_in_process": []}
    for _ in range(args.repeats):  # alternate the four, each after the machine cooled down; keep each's best
        loads.start_round()
        runs["plain"].append(plain_decode(paths, args.size))
        loads.start_round()
        runs["plain_all_cores"].append(plain_decode_pool(paths, args.size, args.cpus))
        loads.start_round()
        runs["echo_pipeline"].append(pipeline(paths, work / "echo", ECHO, decode))
        loads.start_round()  # the same run without Ray: decode in one DataLoader worker per core
        runs["echo_in_process"].append(pipeline(paths, work / "echo_local", ECHO,
                                                {**decode, "local_workers": args.cpus}, in_process=True))
    return runs


def coca_runs(work: Path, args: argparse.Namespace) -> dict[str, dict]:
    """coca-tiny through the pipeline, as initialised and with peaked logits."""
    paths = make_shards(work / "coca_shards", 1, args.coca_images, args.image_px)
    return {"as_initialised": pipeline(paths, work / "coca", COCA, {}),
            "peaked_logits": pipeline(paths, work / "coca", {**COCA, "checkpoint": peaked_coca(work)}, {})}


def _best(runs: list[dict]) -> dict:
    return max(runs, key=lambda r: r["images_per_s"])


def per_core_ratios(cpus: int, plain: dict, pooled: dict, piped: dict) -> tuple[float, float]:
    """Pipeline images/s per core over the plain per-core rate: on all cores, and of one process."""
    return piped["images_per_s"] / cpus / pooled["per_core"], piped["images_per_s"] / cpus / plain["images_per_s"]


def summary(args: argparse.Namespace, loads: RoundLoads, runs: dict[str, list[dict]], coca: dict) -> dict:
    """This bench's own detail: the best of each side, every run, and the per-core ratios."""
    plain, pooled, piped = _best(runs["plain"]), _best(runs["plain_all_cores"]), _best(runs["echo_pipeline"])
    ratio, ratio_one = per_core_ratios(args.cpus, plain, pooled, piped)
    here = _best(runs["echo_in_process"])
    return {
        "echo_in_process": here, "per_core_ratio_in_process": round(per_core_ratios(args.cpus, plain, pooled,
                                                                                    here)[0], 3),
        "bench": "recaption_echo", "cpus": args.cpus, "machine": platform.platform(),
        "load_avg_1m": round(os.getloadavg()[0], 2), **loads.summary(), "shards": args.shards,
        "images_per_shard": args.per_shard, "image_px": [args.image_px, int(args.image_px * 0.75)],
        "resize_to": args.size, "plain_decode_one_process": plain, "plain_decode_all_cores": pooled,
        "echo_pipeline": piped, "all_runs": runs, "per_core_ratio": round(ratio, 3),
        "per_core_ratio_vs_one_process": round(ratio_one, 3), "goal_ratio": 0.95, "coca_tiny_cpu_pipeline": coca,
    }


def harness_rows(args: argparse.Namespace, loads: RoundLoads, result: dict) -> list[dict]:
    """The harness's common row format (bench/common.py), beside this bench's own detail."""
    piped, pooled, here = result["echo_pipeline"], result["plain_decode_all_cores"], result["echo_in_process"]
    note = f"{args.shards}x{args.per_shard} JPEGs {args.image_px}px -> {args.size}; best of runs; {loads.note()}"
    peer = f"plain PIL decode+resize, {args.cpus} processes"
    return [row("recaption", "echo pipeline images/s per core, in process (ray.in_process, no Ray)",
                here["images_per_s"] / args.cpus, pooled["per_core"], peer, "images/s/core", notes=note + "; "
                f"decode in {args.cpus} DataLoader workers, the captioner and writer in the run's process",
                rounds=loads),
            row("recaption", "echo pipeline images/s per core, Ray Data", piped["images_per_s"] / args.cpus,
                pooled["per_core"], peer, "images/s/core", notes=note, rounds=loads),
            *[row("recaption", f"coca-tiny {k.replace('_', ' ')} images/s", v["images_per_s"], None, "", "images/s",
                  notes="5 captions per image, seq_len 30, CPU, one actor")
              for k, v in result["coca_tiny_cpu_pipeline"].items()]]


def markdown_lines(args: argparse.Namespace, result: dict) -> list[str]:
    plain, pooled, piped = (result[k] for k in ("plain_decode_one_process", "plain_decode_all_cores",
                                                "echo_pipeline"))
    plains, pools, pipes, heres = (result["all_runs"][k] for k in ("plain", "plain_all_cores", "echo_pipeline",
                                                                   "echo_in_process"))
    ratio, ratio_one = per_core_ratios(args.cpus, plain, pooled, piped)
    here = result["echo_in_process"]
    return [
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
        f"| the pipeline in process (`ray.in_process`: {args.cpus} decode workers, no Ray; best of {len(heres)}) | "
        f"{here['images']} | {here['seconds']} | {here['images_per_s']} |",
        *[f"| Ray Data pipeline, coca-tiny {k.replace('_', ' ')} (5 captions, CPU, 1 actor) | {v['images']} | "
          f"{v['seconds']} | {v['images_per_s']} |" for k, v in result["coca_tiny_cpu_pipeline"].items()], "",
        f"Per-core ratio (pipeline images/s / {args.cpus} CPUs) / (plain images/s per core, {args.cpus} processes): "
        f"**{ratio:.2f}** through Ray Data; **{result['per_core_ratio_in_process']:.2f}** in process (goal >= 0.95); "
        f"Ray Data against one plain process on an otherwise idle machine: {ratio_one:.2f}.",
        "All runs (images/s): plain 1 process " + ", ".join(str(r["images_per_s"]) for r in plains)
        + f"; plain {args.cpus} processes " + ", ".join(str(r["images_per_s"]) for r in pools) + "; pipeline "
        + ", ".join(str(r["images_per_s"]) for r in pipes) + "; in process "
        + ", ".join(str(r["images_per_s"]) for r in heres) + ".",
    ]


def main(argv=None, quick: bool = False) -> int:
    """`argv` None = defaults (as `python -m bench.run` calls it); `quick` shrinks the inputs for a smoke run."""
    args = parse_args(argv, quick)
    work = ROOT / "results" / "tmp" / "recaption_echo"
    paths = make_shards(work / "shards", args.shards, args.per_shard, args.image_px)
    loads = RoundLoads(quick=quick)
    with ray_session(RayConfig(num_cpus=args.cpus)):
        runs = echo_rounds(paths, work, args, loads)
        coca = coca_runs(work, args)
    result = summary(args, loads, runs, coca)
    result = {"name": "recaption_echo", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "hardware": hardware(), "rows": harness_rows(args, loads, result), **result}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recaption_echo.json").write_text(json.dumps(result, indent=2))
    md = markdown_lines(args, result)
    (out / "recaption_echo.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
