"""The recaption pipeline in this process (`ray.in_process: true`), no Ray: a run on one machine pays for no Ray
start, object store or actor pool. The same row functions as the Ray Data pipeline (pipeline.py): canonical rows
per shard (`data.shards.shard_tables`), `decoded_rows`, the captioner (`CaptionActor.captioned`, built here), the
teachers, the per-shard writer. Decode runs in `decode.local_workers` torch DataLoader worker processes, worker k of
W taking input shards k, k+W, ... (each shard read once); pixels come back in a ring of shared buffers
(data/shared_ring.py). The captioner and the teachers run here on what arrives, and the results are handed to the
writer shard by shard in input order (a shard when its worker has sent all of its rows), so outputs, resume and
exactly-once are the Ray pipeline's.
"""
from __future__ import annotations

import contextlib
import functools
import os
import time

import numpy as np
import torch
from torch.utils.data import IterableDataset

from clipdense.data.loader import chunks, ordered_loader, worker_slot
from clipdense.data.paths import ShardFiles
from clipdense.data.rows import errors_from
from clipdense.data.shards import shard_tables
from clipdense.data.shared_ring import RingStopped, SharedRing
from clipdense.data.tar_rows import shard_rows
from clipdense.recaption.config import DecodeConfig, FaultConfig, TeachersConfig
from clipdense.recaption.decode import ImageInput
from clipdense.recaption.engines.resolve import Engine
from clipdense.recaption.pipeline import CaptionActor, decoded_rows, shard_assembler
from clipdense.recaption.plan import Plan
from clipdense.recaption.teachers import TeacherActor
from clipdense.recaption.views import ViewBatch, ViewDrawer
from clipdense.recaption.writer import ShardAssembler

TEACHER_BLOCK_ROWS = 64
PREFETCH = 2  # blocks ahead per decode worker


class _DecodedShards(IterableDataset):
    """(shard index, decoded rows, the index of this worker's pixel block in `ring` or None, the teachers' views
    or None) per block of each of this worker's shards, then (shard index, None, None, None) once the shard is
    done. Array-mode pixels go to `ring` (the run's process reads them there and releases each block). With a
    `drawer` the workers also draw the teachers' views (their per-image CPU work), so the run's process only runs
    models."""

    def __init__(self, todo: ShardFiles, spec: ImageInput, block_rows: int, keep_images: bool,
                 ring: SharedRing | None, drawer: ViewDrawer | None = None):
        self.todo, self.spec, self.block_rows, self.keep_images = todo, spec, block_rows, keep_images
        self.ring, self.drawer = ring, drawer

    def __iter__(self):
        k, w = worker_slot()
        made = 0
        try:
            for i, uri in enumerate(self.todo.files):
                if i % w != k:
                    continue
                for block in self._blocks(uri):
                    index = None if self.ring is None else made  # no ring: jpeg mode, no pixels
                    alloc = np.empty if index is None else functools.partial(self._claim, k, index)
                    rows, _ = decoded_rows(block, self.spec, self.keep_images, alloc=alloc)
                    made += index is not None
                    yield i, rows, index, self._views(rows)
                yield i, None, None, None
        except RingStopped:
            return

    def _claim(self, k: int, block: int, shape: tuple, dtype) -> np.ndarray:
        assert dtype == np.uint8 and tuple(shape[1:]) == self.ring.shape[1:], (shape, dtype)
        return self.ring.claim(k, block, shape[0])

    def _views(self, rows) -> ViewBatch | None:
        """The rows' views (rows in error left empty); None where drawing failed: the teachers then draw them
        again and record the failure on the rows, as in the Ray pipeline."""
        if self.drawer is None:
            return None
        ok = [i for i, e in enumerate(errors_from(rows)) if e is None]
        if not ok:
            return None
        images, keys = rows.column("image_bytes").to_pylist(), rows.column("key").to_pylist()
        try:
            drawn = self.drawer([images[i] for i in ok], [str(keys[i]) for i in ok])
        except Exception:  # noqa: BLE001  (recorded per row by the teachers' own attempt)
            return None
        return ViewBatch.scatter(drawn, ok, rows.num_rows)

    def _blocks(self, uri: str):
        """A shard's canonical rows, `block_rows` at a time: a tar's as column lists (its image bytes never become
        Arrow: the plain loop's cost), a Parquet shard's as Arrow tables."""
        file, sidecar = self.todo.storage.at(uri), self.todo.sidecars.get(uri)
        sidecar = file.at(sidecar) if sidecar else None
        if not uri.endswith(".tar"):
            yield from shard_tables(file, sidecar, validate="none", batch_rows=self.block_rows,
                                    max_pixels=self.spec.max_image_pixels)
            return
        with file.open_input_stream() as f:
            rows = shard_rows(f, uri, "none", self.spec.max_image_pixels, sidecar)
            for chunk in chunks(rows, self.block_rows):
                yield {name: [r[name] for r in chunk] for name in chunk[0]}


class _InOrder:
    """Result blocks by input shard, handed to the writer shard by shard in input order as each completes."""

    def __init__(self, assembler: ShardAssembler, shards: int):
        self.assembler, self.parts, self.done, self.next = assembler, [[] for _ in range(shards)], set(), 0

    def add(self, shard: int, block) -> None:
        self.parts[shard].append(block)

    def complete(self, shard: int) -> None:
        self.done.add(shard)
        while self.next in self.done:
            for block in self.parts[self.next]:
                self.assembler.add(block)
            self.parts[self.next] = []
            self.next += 1


def local_decode_workers(decode: DecodeConfig, engine_cpus: float) -> int:
    """`decode.local_workers`, or by default this machine's cores less those the captioner holds (at least 1)."""
    if decode.local_workers is not None:
        return decode.local_workers
    cores = len(os.sched_getaffinity(0))
    return max(1, cores - int(round(engine_cpus)))


def caption_shards_here(todo: ShardFiles, plan: Plan, engine: Engine, decode: DecodeConfig, fault: FaultConfig,
                        keep_images: bool, teachers: TeachersConfig | None = None) -> tuple[ShardAssembler, float]:
    """`pipeline.caption_shards` without Ray: the same outputs, written as each shard completes."""
    e = engine.config
    captioner = CaptionActor(e.model_dump(), fault.model_dump())  # EngineLoadError: run.py makes it one line
    teacher = None
    if teachers is not None:
        teacher = TeacherActor(teachers.model_dump(), decode.max_image_pixels, keep_images,
                               e.rerank.keep if e.rerank else None)
    assembler = shard_assembler(plan, engine, fault, keep_images, teachers)
    ordered = _InOrder(assembler, len(todo.files))
    workers = local_decode_workers(decode, e.num_cpus)
    drawer = teacher.forward.drawer(decode.max_image_pixels) if teacher is not None and workers else None
    # with teachers a block also carries each teacher's float input of every view (at 224 px, 0.6 MB a view):
    # blocks of 64 rows keep the workers' prefetched blocks small
    block_rows = decode.batch_size or (TEACHER_BLOCK_ROWS if teacher is not None else 256)
    spec = engine.image
    ring = SharedRing(workers, PREFETCH + 1, (block_rows, spec.size, spec.size, 3)) if spec.mode == "array" else None
    source = _DecodedShards(todo, spec, block_rows, keep_images or teachers is not None, ring, drawer)
    loader = ordered_loader(source, workers, prefetch=PREFETCH)
    t0 = time.perf_counter()
    with _threads(e.num_cpus + (teachers.num_cpus if teachers is not None else 0)), _stopping(ring):
        for shard, rows, block_index, drawn in loader:
            if rows is None:
                ordered.complete(shard)
                continue
            k = shard % max(1, workers)  # the worker that made it (worker k of W takes shards k, k+W, ...)
            pixels = None if block_index is None else ring.view(k, block_index, rows.num_rows)
            for lo, n in _slices(rows.num_rows, e.batch_size):
                block = captioner.captioned(rows.slice(lo, n), None if pixels is None else pixels[lo:lo + n].numpy())
                if teacher is None:
                    ordered.add(shard, block)
                    continue
                for t_lo, t_n in _slices(block.num_rows, teachers.batch_size):
                    views = None if drawn is None else drawn.slice(lo + t_lo, t_n)
                    ordered.add(shard, teacher(block.slice(t_lo, t_n), views))
            if block_index is not None:
                ring.release(k)
    assembler.finish()
    return assembler, time.perf_counter() - t0


@contextlib.contextmanager
def _stopping(ring: SharedRing | None):
    """Workers waiting for a slot of `ring` stop when the loop ends, early or not."""
    try:
        yield
    finally:
        if ring is not None:
            ring.stop()


@contextlib.contextmanager
def _threads(cpus: float):
    """torch's threads for the models run here: the CPUs Ray would give the captioner and a teacher actor
    (`engine.num_cpus` + `teachers.num_cpus`; the decode workers hold the rest of the cores); unchanged when they
    reserve none (one thread per teacher CPU beside the view-drawing workers: bench/teacher_forward.py)."""
    before = torch.get_num_threads()
    if cpus >= 1:
        torch.set_num_threads(int(round(cpus)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _slices(n: int, size: int):
    """(start, length) of consecutive runs of at most `size` of n rows."""
    for lo in range(0, n, size):
        yield lo, min(size, n - lo)

