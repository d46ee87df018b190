"""Pretrain rows read without Ray: the data path of a run in this process (`ray.in_process`) whose data needs no
cluster (`data.loader`, pretrain/config.py). A short local run then pays for no Ray start and no Ray Data plan per
epoch (bench/results/pretrain_profile.md).

The rows are the Ray Data pipeline's (pretrain/data.py), made by the same functions: canonical rows per shard
(`data.shards.shard_tables`), the recaption join, the counts, the decode (`decoded_columns`), the collate. Decode,
crop, caption choice and tokenisation run in `data.local_workers` torch DataLoader worker processes, forked once
per run (not per epoch: new workers each epoch left its first batches waiting, bench/results/pretrain_profile.md).
The run's items are numbered across epochs (each epoch's batches from its start, then an end-of-epoch item); worker
k of W makes items k, k+W, ... (each reads and joins every row, and decodes only its batches' images), and
DataLoader's in-order round-robin hands them back in order: the same batches for any W. Batches are cut from the
usable joined rows before decoding, so a row whose pixels fail to decode (after its header passed) leaves its batch
one row short instead of shifting the epoch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np
from torch.utils.data import DataLoader, IterableDataset

from clipdense.data.loader import chunks, ordered_loader, worker_slot
from clipdense.data.shards import shard_tables
from clipdense.pretrain.config import DataConfig, EvalConfig
from clipdense.pretrain.data import (
    KEPT_COLUMNS,
    Sources,
    check_counts,
    count_columns,
    count_rows,
    decoded_columns,
    first_ok_keys,
)
from clipdense.pretrain.join import join_recaptions

# a joined row's fields, in the order `decoded_columns` takes them
_ROW = ("key", "image_bytes", "caption", "syn_captions", "syn_scores", "aug_params", "teacher_emb")


def joined_tables(src: Sources, data: DataConfig) -> Iterator:
    """`src`'s canonical rows joined with their recaptions (pyarrow tables of `data.decode_batch_size` rows), in
    shard order, as the Ray Data pipeline's `joined_rows` makes them."""
    for uri in src.shards.files:
        sidecar = src.shards.sidecars.get(uri)
        file = src.shards.storage.at(uri)
        for table in shard_tables(file, file.at(sidecar) if sidecar else None, validate=data.validate_images,
                                  batch_rows=data.decode_batch_size):
            yield join_recaptions(table, src.recaptions, src.policy, src.min_score)


def usable_rows(src: Sources, data: DataConfig, drop_keys: frozenset = frozenset(),
                only_keys: frozenset | None = None) -> Iterator[tuple]:
    """The joined rows without a row error (minus `drop_keys`, or only `only_keys`) as `_ROW` tuples, in order."""
    for table in joined_tables(src, data):
        cols = table.select(["error_code", *_ROW]).to_pydict()
        for error, *row in zip(*cols.values()):
            if error is None and row[0] not in drop_keys and (only_keys is None or row[0] in only_keys):
                yield tuple(row)


def _shuffled(rows: Iterable, buffer: int, seed: int) -> Iterator:
    """A seeded shuffle buffer of `buffer` rows: each row leaves at a random place among the next `buffer`."""
    rng = np.random.default_rng(seed)
    held: list = []
    for row in rows:
        if len(held) < buffer:
            held.append(row)
            continue
        i = int(rng.integers(len(held)))
        held[i], row = row, held[i]
        yield row
    rng.shuffle(held)
    yield from held


def _columns(decoded: list[tuple]) -> dict[str, list]:
    """Decoded rows (tuples in `KEPT_COLUMNS` order) -> the batch of columns the collate takes."""
    return {name: list(values) for name, values in zip(KEPT_COLUMNS, zip(*decoded))}


def _as_rows(columns: dict[str, list]) -> list[tuple]:
    return list(zip(*(columns[name] for name in KEPT_COLUMNS)))


def _loader(dataset: IterableDataset, data: DataConfig) -> DataLoader:
    return ordered_loader(dataset, data.local_workers, data.prefetch_batches)




class _DecodedChunks(IterableDataset):
    """Decoded rows of `rows()` in chunks of `chunk` (worker k of W decodes chunks k, k+W, ...)."""

    def __init__(self, rows: Callable[[], Iterable[tuple]], chunk: int, size: int, crop_source: bool):
        self.rows, self.chunk, self.size, self.crop_source = rows, chunk, size, crop_source

    def __iter__(self):
        k, w = worker_slot()
        for i, chunk in enumerate(chunks(self.rows(), self.chunk)):
            if i % w == k:
                yield _as_rows(decoded_columns(chunk, self.size, self.crop_source))


BATCH, EMPTY, END = "batch", "empty", "end"  # the kinds of a run's items


class _RunBatches(IterableDataset):
    """(epoch, kind, collated batch or None) items: epoch `epoch`'s batches from `start` on, then each later
    epoch's from its first, every epoch closed by an END item (module docstring: which worker makes which). A batch
    whose images all failed to decode is an EMPTY item, so that every item keeps its place."""

    def __init__(self, rows: LocalRows, collate, batch_size: int, epoch: int, start: int, seed: int):
        self.rows, self.collate, self.batch_size, self.epoch, self.start = rows, collate, batch_size, epoch, start
        self.seed = seed

    def __iter__(self):
        k, w = worker_slot()
        item, epoch, start = 0, self.epoch, self.start   # item: the number of the epoch's first item
        while True:
            made = start
            for b, chunk in enumerate(self._full_batches(epoch)):
                made = b + 1
                if b >= start and (item + b - start) % w == k:
                    yield self._item(epoch, chunk)
            end = item + max(made - start, 0)
            if end % w == k:
                yield epoch, END, None
            item, epoch, start = end + 1, epoch + 1, 0

    def _full_batches(self, epoch: int):
        rows, d = self.rows, self.rows.data
        stream = rows.cached if rows.cached is not None else usable_rows(rows.source, d, rows.drop_keys)
        if d.shuffle_buffer:
            stream = _shuffled(stream, d.shuffle_buffer, self.seed + epoch)
        for chunk in chunks(stream, self.batch_size):
            if len(chunk) < self.batch_size:
                return  # drop_last, as the Ray Data path
            yield chunk

    def _item(self, epoch: int, chunk: list[tuple]) -> tuple:
        rows = self.rows
        batch = _columns(chunk) if rows.cached is not None else decoded_columns(chunk, rows.size, True)
        if not batch["key"]:
            return epoch, EMPTY, None
        return epoch, BATCH, self.collate.for_epoch(epoch)(batch)


@dataclass
class LocalRows:
    """A pretrain dataset read in this process, standing where a Ray Data shard would (`iterator()`): the training
    rows of `source` (read again each epoch, or decoded once: `cached`), or the eval rows (decoded, `cached`)."""

    data: DataConfig
    size: int
    source: Sources | None = None
    drop_keys: frozenset = frozenset()
    cached: list[tuple] | None = None  # decoded rows, `KEPT_COLUMNS` order
    _run: Iterator | None = field(default=None, init=False, repr=False)   # the run's items (_RunBatches)
    _run_at: tuple | None = field(default=None, init=False, repr=False)  # (batch size, seed, next epoch)

    def iterator(self) -> LocalRows:
        return self

    def train_batches(self, collate, batch_size: int, epoch: int, start_batch: int, seed: int) -> Iterator:
        """Epoch `epoch`'s collated batches from batch `start_batch` on (`collate.for_epoch(e)` collates epoch e;
        `seed` + epoch seeds the shuffle buffer). One loader serves the epochs in turn, its workers making the next
        epoch's first batches while this one ends; asked for anything else (a resume mid-epoch, an epoch left
        unfinished), it starts again from there."""
        if self._run is None or start_batch or self._run_at != (batch_size, seed, epoch):
            collate.prepare()  # load what every forked worker would load again (the tokenizer) once, here
            self._run = iter(_loader(_RunBatches(self, collate, batch_size, epoch, start_batch, seed), self.data))
        self._run_at = None  # until this epoch is read to its end
        return self._epoch(epoch, (batch_size, seed, epoch + 1))

    def _epoch(self, epoch: int, then: tuple) -> Iterator:
        for e, kind, batch in self._run:
            if e != epoch:
                raise RuntimeError(f"local loader: an item of epoch {e} came in epoch {epoch}")
            if kind == END:
                self._run_at = then
                return
            if kind == BATCH:
                yield batch

    def iter_batches(self, batch_size: int, batch_format: str = "numpy") -> Iterator[dict]:
        """The decoded rows in batches of columns (the eval rows: as a Ray Data shard's numpy batches)."""
        for chunk in chunks(self.cached or [], batch_size):
            yield _columns(chunk)

    def __len__(self) -> int:
        return len(self.cached or [])


def _decode_all(rows: Callable[[], Iterable[tuple]], data: DataConfig, size: int, crop_source: bool,
                limit: int | None = None) -> list[tuple]:
    decoded: list[tuple] = []
    for part in _loader(_DecodedChunks(rows, data.decode_batch_size, size, crop_source), data):
        decoded += part
        if limit is not None and len(decoded) >= limit:
            return decoded[:limit]
    return decoded


def build_local_datasets(train: Sources, held_out: Sources | None, data: DataConfig, ev: EvalConfig,
                         image_size: int, distill: bool = False) -> tuple[LocalRows, LocalRows | None, dict]:
    """(train rows, eval rows or None, counts) as `pretrain.data.build_datasets` makes them, read in this process."""
    counts = count_rows((t.select(count_columns(train.min_score)) for t in joined_tables(train, data)),
                        train.min_score) if data.count_errors else {}
    check_counts(counts, data.shards, distill)
    held: frozenset = frozenset()
    eval_rows = None
    if held_out is None and ev.holdout:
        held = frozenset(first_ok_keys(joined_tables(train, data), ev.holdout)[0])
        rows = _decode_all(lambda: usable_rows(train, data, only_keys=held), data, image_size, False, len(held))
        eval_rows = LocalRows(data, image_size, cached=rows)
    elif held_out is not None:
        rows = _decode_all(lambda: usable_rows(held_out, data), data, image_size, False, ev.max_rows)
        eval_rows = LocalRows(data, image_size, cached=rows)
    train_rows = LocalRows(data, image_size, train, held)
    if data.cache:  # decoded whole images, once; the random crop still runs per epoch in the collate
        train_rows.cached = _decode_all(lambda: usable_rows(train, data, held), data, image_size, True)
    if eval_rows is not None:
        counts["eval_rows"] = len(eval_rows)
    counts["holdout_rows"] = len(held)
    return train_rows, eval_rows, counts
