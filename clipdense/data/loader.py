"""Reading without Ray: the torch DataLoader pattern the stages' in-process paths share (pretrain/local_data.py,
recaption/local.py). An IterableDataset whose worker k of W makes items k, k+W, ... (`worker_slot`) comes back
from `ordered_loader` in its own order, each item as the worker made it (no collation, no tensor conversion).
"""
from __future__ import annotations

import itertools
from typing import Iterable, Iterator

from torch.utils.data import DataLoader, IterableDataset, get_worker_info


def worker_slot() -> tuple[int, int]:
    """(this DataLoader worker's index, the number of workers); (0, 1) in the loading process itself."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def chunks(rows: Iterable, n: int) -> Iterator[list]:
    """Consecutive lists of `n` rows (the last one shorter)."""
    it = iter(rows)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


def _unchanged(item):  # DataLoader's per-item convert (batch_size None): keep arrays, tables and lists as they are
    return item


def ordered_loader(dataset: IterableDataset, workers: int, prefetch: int) -> DataLoader:
    """`dataset`'s items from `workers` worker processes (0: this process), in round-robin order over the workers,
    `prefetch` items ahead per worker."""
    more = {"prefetch_factor": max(1, prefetch)} if workers else {}
    return DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=_unchanged, **more)
