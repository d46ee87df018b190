"""Fixed shared-memory buffers that DataLoader workers fill and the loading process reads, reused block after
block (the in-process recaption pipeline's decoded pixels: recaption/local.py).

A fresh shared segment per block pays its pages' first-touch faults again for every block (measured in
bench/results/recaption_profile.md); a ring made before the workers fork is mapped by both sides once. Worker k
writes its j-th block into slot j % slots only once the loading process has released its block j - slots, so a slot
is never overwritten while it is read, whatever order the loader asks in. With `slots` > the loader's prefetch
per worker the wait never happens in practice: the loader asks for a worker's block j only after taking its block
j - prefetch, by which time every earlier block of that worker was released.
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch


class RingStopped(Exception):
    """The loading process stopped the ring (it finished early or failed): the worker stops making blocks."""


class SharedRing:
    """`workers` rings of `slots` uint8 buffers of `shape`, in shared memory; per worker the count of blocks
    released by the loading process, and a stop flag. Make it before the DataLoader starts its workers."""

    def __init__(self, workers: int, slots: int, shape: tuple[int, ...]):
        self.slots, self.shape = slots, tuple(shape)
        self.buffers = torch.empty((max(1, workers), slots, *shape), dtype=torch.uint8).share_memory_()
        self.released = torch.zeros(max(1, workers) + 1, dtype=torch.int64).share_memory_()  # last: stop flag
        self.parent = os.getpid()

    def claim(self, worker: int, block: int, rows: int, poll_s: float = 0.001) -> np.ndarray:
        """(worker side) The slot of this worker's `block`-th block, its first `rows` rows, once it is free."""
        while block - int(self.released[worker]) >= self.slots:
            if os.getpid() == self.parent:  # no workers: the loading process itself releases before it asks again
                raise RuntimeError(f"shared ring: block {block} asked for before block {block - self.slots} "
                                   "was released")
            if int(self.released[-1]) or os.getppid() != self.parent:
                raise RingStopped()
            time.sleep(poll_s)
        return self.buffers[worker, block % self.slots, :rows].numpy()

    def view(self, worker: int, block: int, rows: int) -> torch.Tensor:
        """(loading side) What the worker wrote as its `block`-th block."""
        return self.buffers[worker, block % self.slots, :rows]

    def release(self, worker: int) -> None:
        """(loading side) Done with the worker's oldest unreleased block: its slot may be written again."""
        self.released[worker] += 1

    def stop(self) -> None:
        """(loading side) Workers waiting for a slot stop instead (the loader is being shut down)."""
        self.released[-1] = 1
