"""The recaption benches' plain side: read the tars + `prepare_image` in one process, or one process per core.

A module of its own: the per-core pool's spawned workers import it, and only what the plain loop needs.
"""
from __future__ import annotations

import multiprocessing as mp
import time

from clipdense.data.shards import read_shard_local
from clipdense.data.storage import Storage
from clipdense.recaption.decode import ImageInput, prepare_image


def plain_decode(paths: list[str], size: int) -> dict:
    spec = ImageInput(size=size)
    t0, c0, n = time.perf_counter(), time.process_time(), 0
    for p in paths:
        for sample in read_shard_local(Storage(p), validate="none"):
            prepare_image(sample["image_bytes"], spec)
            n += 1
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"images": n, "seconds": round(wall, 3), "cpu_seconds": round(cpu, 3), "images_per_s": round(n / wall, 1)}


def _plain_worker(args: tuple[list[str], int]) -> dict:
    return plain_decode(*args)


def plain_decode_pool(paths: list[str], size: int, procs: int) -> dict:
    """`plain_decode` in one process per core, shards split between them: the machine loaded as the pipeline
    loads it. images_per_s is the total; per_core divides it by `procs`."""
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
