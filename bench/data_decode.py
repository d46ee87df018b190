"""Pretrain data path: Ray Data decode + augment (the pretrain stage's own functions) vs one plain process.

    python -m bench.data_decode [--shards 4] [--per-shard 500] [--size 224] [--quick]

Same tar shards of photo-like 320x240 JPEGs on both sides. Ours: `clipdense.pretrain.data.build_datasets` (read
shards -> join captions -> decode the whole image, JPEG-draft reduced only as far as the crop allows, in Ray Data
tasks over every core) iterated with the train collate (`pretrain.batches.Collate`: per-sample RandomResizedCrop
drawn on the original geometry, bicubic, normalise, tokenise), exactly as the pretrain task reads it. Peers, one
process reading the same tars: (a) raw PIL decode + resize + centre crop (the brief's baseline), (b) open_clip's own
train transform (`image_transform(224, is_train=True)`: decode, RandomResizedCrop, ToTensor, Normalize), what
open_clip_train's data loader workers run per image.
Two ratios: per core of wall time = (our images/s / cores) / (peer images/s on one core), and per CPU-second
(images / CPU time of every process involved: for ours the driver plus all of the Ray session's processes), which
other jobs on a shared machine disturb far less. >= 1 means the Ray Data path costs nothing per unit of CPU.
Best of alternating rounds on each side. A second set of shards holds photo-size JPEGs (longer side 800-1200 px,
as web images are before img2dataset resizes them): the "large JPEGs" row compares ours (which decodes them at a
DCT scale, `Image.draft`) with open_clip's train transform as open_clip ships it (full decode). Writes
bench/results/data_decode.json and .md.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import ray
import torch
from PIL import Image

from bench.common import RoundLoads, row, write_report
from bench.jpeg_shards import make_shards
from clipdense.config import build_config
from clipdense.pretrain import PretrainConfig
from clipdense.pretrain.batches import Collate
from clipdense.pretrain.data import build_datasets
from clipdense.pretrain.run import row_sources


def make_large_shards(d: Path, shards: int, per_shard: int, seed: int = 1) -> list[str]:
    """Tar shards of photo-size JPEGs: longer side 800-1200 px, aspect 3:4 to 4:3 either way, gradients + noise."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    noise = rng.normal(0, 12, (1200, 1200, 3)).astype(np.float32)  # one field, cropped per image (fast to make)
    paths = []
    for s in range(shards):
        path = d / f"large{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                long = int(rng.integers(800, 1201))
                short = int(long * rng.uniform(0.75, 1.0))
                w, h = (long, short) if rng.random() < 0.5 else (short, long)
                c = rng.uniform(0.1, 0.6, 6)
                yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
                img = np.stack([(c[k] * yy + c[k + 3] * xx) % 256 for k in range(3)], -1) + noise[:h, :w]
                buf = io.BytesIO()
                Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
                for ext, data in (("jpg", buf.getvalue()), ("txt", f"photo {s} {i}".encode())):
                    info = tarfile.TarInfo(f"{s:05d}{i:05d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths


def _tar_images(paths: list[str]):
    for p in paths:
        with tarfile.open(p) as tar:
            for m in tar:
                if m.name.endswith(".jpg"):
                    yield tar.extractfile(m).read()


def ray_cpu_seconds() -> float:
    """CPU seconds used so far by this process and every process of this Ray session (raylet, GCS, workers)."""
    import psutil  # ships with Ray (its thirdparty_files), importable once `ray` is imported

    session = ray._private.worker._global_node.get_session_dir_path()
    procs = {}
    for p in psutil.process_iter(["cmdline"]):
        if session in " ".join(p.info["cmdline"] or []):
            procs[p.pid] = p
            procs.update({c.pid: c for c in p.children(recursive=True)})
    procs.pop(os.getpid(), None)
    total = time.process_time()
    for p in procs.values():
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def _rates(n: int, t0: float, c0: float, c1: float) -> tuple[float, float]:
    """(images/s of wall time, images per CPU-second)."""
    return n / (time.perf_counter() - t0), n / max(c1 - c0, 1e-9)


def plain_pil(paths: list[str], size: int) -> tuple[float, float]:
    """PIL decode, shorter side to `size` (bicubic), centre crop, to a uint8 array; one process."""
    t0, c0, n = time.perf_counter(), time.process_time(), 0
    for data in _tar_images(paths):
        im = Image.open(io.BytesIO(data)).convert("RGB")
        w, h = im.size
        s = size / min(w, h)
        im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
        left, top = (im.width - size) // 2, (im.height - size) // 2
        np.asarray(im.crop((left, top, left + size, top + size)))
        n += 1
    return _rates(n, t0, c0, time.process_time())


def open_clip_transform(paths: list[str], size: int) -> tuple[float, float]:
    """open_clip's train transform (decode + RandomResizedCrop + ToTensor + Normalize); one process."""
    tf = open_clip.image_transform(size, is_train=True)
    t0, c0, n = time.perf_counter(), time.process_time(), 0
    for data in _tar_images(paths):
        tf(Image.open(io.BytesIO(data)))
        n += 1
    return _rates(n, t0, c0, time.process_time())


def pipeline(paths: list[str], size: int, batch: int, decode_on: str = "cpu") -> tuple[float, float]:
    """The pretrain stage's Ray Data read + decode and train collate (Ray must be initialised); `decode_on`
    worker: Ray Data ships the encoded images and the collate decodes them (data.decode_on)."""
    cfg = build_config(PretrainConfig, {
        "model": {"name": "ViT-B-16"}, "captions": {"policy": "real"}, "ray": {"in_process": True},
        "data": {"shards": paths, "batch_size": batch, "decode_cpus": 1, "count_errors": False,
                 "decode_on": decode_on}})
    t0, c0 = time.perf_counter(), ray_cpu_seconds()
    train, _, _ = build_datasets(*row_sources(cfg.data, cfg.eval, cfg.captions.policy), cfg.data, cfg.eval, size)
    collate = Collate(model_name="ViT-B-16", image_size=size, mean=(0.48, 0.46, 0.41), std=(0.27, 0.26, 0.28),
                      policy="real", seed=0, epoch=0, train=True, decode_on=decode_on)
    n = 0
    for b in train.iterator().iter_torch_batches(batch_size=batch, collate_fn=collate, prefetch_batches=2):
        n += b["image"].shape[0]
    return _rates(n, t0, c0, ray_cpu_seconds())


def _fmt(runs) -> str:
    return ", ".join(f"({w:.0f}, {c:.0f})" for w, c in runs)


def parse_args(argv: list[str] | None, quick: bool) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.data_decode")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--per-shard", type=int, default=500)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--large-per-shard", type=int, default=150)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv or [])
    a.quick = quick or a.quick
    if a.quick:
        a.shards, a.per_shard, a.large_per_shard, a.rounds = 2, 150, 30, 1
    return a


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to `n` for the block, restored after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def local_ray(cores: int):
    """A local Ray over `cores` CPUs for the block, unless this process already runs one (then left running)."""
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def measure_rounds(paths: list[str], large: list[str], a: argparse.Namespace,
                   loads: RoundLoads) -> dict[str, list[tuple[float, float]]]:
    """(images/s, images/CPU-s) of every side per round; Ray must be running."""
    pipeline(paths[:1], a.size, a.batch)  # start Ray's workers once: measure the steady state
    pipeline(paths[:1], a.size, a.batch, "worker")
    sides = {
        "raw": lambda: plain_pil(paths, a.size),
        "oc": lambda: open_clip_transform(paths, a.size),
        "ours": lambda: pipeline(paths, a.size, a.batch),
        "oc_large": lambda: open_clip_transform(large, a.size),
        "ours_large": lambda: pipeline(large, a.size, a.batch),
        "worker": lambda: pipeline(paths, a.size, a.batch, "worker"),
        "worker_large": lambda: pipeline(large, a.size, a.batch, "worker"),
    }
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
    for _ in range(a.rounds):  # alternate the sides, each after the machine has cooled down
        for name, measure in sides.items():
            loads.start_round()
            runs[name].append(measure())
    return runs


def _best(runs: list[tuple[float, float]], i: int) -> float:
    """The best of the rounds: i = 0 images/s, 1 images/CPU-s."""
    return max(r[i] for r in runs)


def report_rows(runs: dict[str, list[tuple[float, float]]], a: argparse.Namespace, cores: int,
                loads: RoundLoads) -> list[dict]:
    ours, raw, oc, ours_large, oc_large = (runs[k] for k in ("ours", "raw", "oc", "ours_large", "oc_large"))
    worker, worker_large = runs["worker"], runs["worker_large"]
    n = a.shards * a.per_shard
    note = (f"{n} JPEGs 320x240 in {a.shards} tars -> {a.size}px; ours: Ray Data over {cores} cores + collate in "
            f"the driver; best of {a.rounds} alternating rounds; {loads.note()}")
    return [
        row("data", "decode+augment images/s per core vs raw PIL decode+resize", _best(ours, 0) / cores,
            _best(raw, 0), "PIL decode+resize+crop, 1 process", "images/s/core", notes=note, rounds=loads),
        row("data", "decode+augment images/s per core vs open_clip train transform", _best(ours, 0) / cores,
            _best(oc, 0), "open_clip image_transform(is_train), 1 process", "images/s/core", notes=note,
            rounds=loads),
        row("data", "decode+augment images per CPU-second vs raw PIL decode+resize", _best(ours, 1), _best(raw, 1),
            "PIL decode+resize+crop, 1 process", "images/CPU-s",
            notes="CPU time of every process involved (ours: driver + the Ray session's processes): robust to "
                  "other jobs' load, unlike wall time per core", rounds=loads),
        row("data", "decode+augment images per CPU-second vs open_clip train transform", _best(ours, 1),
            _best(oc, 1), "open_clip image_transform(is_train), 1 process", "images/CPU-s", rounds=loads),
        row("data", "decode+augment images per CPU-second vs open_clip train transform, large JPEGs (800-1200 px)",
            _best(ours_large, 1), _best(oc_large, 1), "open_clip image_transform(is_train), no draft, 1 process",
            "images/CPU-s", notes=f"{a.shards * a.large_per_shard} JPEGs, longer side 800-1200 px, aspect 3:4-4:3; "
                                  "ours decodes at a JPEG DCT scale (Image.draft) no smaller than the crop needs",
            rounds=loads),
        row("data", "decode+augment images per CPU-second vs open_clip train transform, data.decode_on worker",
            _best(worker, 1), _best(oc, 1), "open_clip image_transform(is_train), 1 process", "images/CPU-s",
            notes="Ray Data ships the encoded JPEGs, the collate (its threads) decodes + crops them: the same pixels, "
                  "no decoded images through the object store", rounds=loads),
        row("data", "decode+augment images per CPU-second vs open_clip train transform, large JPEGs (800-1200 px), "
                    "data.decode_on worker", _best(worker_large, 1), _best(oc_large, 1),
            "open_clip image_transform(is_train), no draft, 1 process", "images/CPU-s", rounds=loads),
        row("data", "decode+augment images/s (all cores)", _best(ours, 0), None, "", "images/s",
            notes=f"runs (images/s, images/CPU-s): ours {_fmt(ours)}, raw PIL {_fmt(raw)}, open_clip {_fmt(oc)}; "
                  f"large JPEGs: ours {_fmt(ours_large)}, open_clip {_fmt(oc_large)}; decode_on worker: "
                  f"{_fmt(worker)}, large {_fmt(worker_large)}"),
    ]


def main(quick: bool = False, argv: list[str] | None = None) -> list[dict]:
    a = parse_args(argv, quick)
    cores = len(os.sched_getaffinity(0))
    loads = RoundLoads(quick=a.quick)
    # one torch thread: the peers are one-core processes, and oversubscribed threads on a shared box swing
    # torch's per-image ops tenfold (ours: the collate in this driver also runs on one thread)
    with torch_threads(1), tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        paths = make_shards(Path(tmp), a.shards, a.per_shard, 320)
        large = make_large_shards(Path(tmp) / "large", a.shards, a.large_per_shard)
        with local_ray(cores):
            runs = measure_rounds(paths, large, a, loads)
    rows = report_rows(runs, a, cores, loads)
    print(write_report("data_decode", "Ray Data decode + augment vs one plain process", __doc__, rows))
    return rows


if __name__ == "__main__":
    main(argv=sys.argv[1:])
