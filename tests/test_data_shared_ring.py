"""The shared ring the in-process recaption pipeline passes decoded pixels through (data/shared_ring.py), with a
real torch DataLoader and its worker processes: a slot is never written again before the loading process released
it, and a stopped ring ends a waiting worker at once."""
import time

import numpy as np
import pytest
from torch.utils.data import IterableDataset

from clipdense.data.loader import ordered_loader, worker_slot
from clipdense.data.shared_ring import RingStopped, SharedRing

BLOCKS, ROWS = 6, 3


class _Stamped(IterableDataset):
    """Each worker's block j: every byte holds 10 * worker + j."""

    def __init__(self, ring: SharedRing):
        self.ring = ring

    def __iter__(self):
        k, _ = worker_slot()
        try:
            for j in range(BLOCKS):
                pixels = self.ring.claim(k, j, ROWS)
                pixels[:] = 10 * k + j
                yield k, j
        except RingStopped:
            return


def test_a_slot_is_not_written_again_before_it_is_released():
    # one slot per worker and a loader asking two blocks ahead: without the wait, a worker would overwrite the
    # block the loading process is still reading
    ring = SharedRing(workers=2, slots=1, shape=(ROWS, 4, 4, 3))
    seen = []
    for k, j in ordered_loader(_Stamped(ring), workers=2, prefetch=2):
        block = ring.view(k, j, ROWS)
        time.sleep(0.05)  # a slow reader: the worker has asked for its next slot meanwhile
        seen.append((k, j, np.unique(block.numpy()).tolist()))
        ring.release(k)
    ring.stop()
    assert seen == [(k, j, [10 * k + j]) for j in range(BLOCKS) for k in range(2)]


def test_a_stopped_ring_ends_a_waiting_worker():
    ring = SharedRing(workers=1, slots=1, shape=(ROWS, 4, 4, 3))
    loader = iter(ordered_loader(_Stamped(ring), workers=1, prefetch=2))
    assert next(loader) == (0, 0)  # never released: the worker waits for its slot for block 1
    ring.stop()
    t0 = time.perf_counter()
    assert list(loader) == []
    assert time.perf_counter() - t0 < 2  # DataLoader's own shutdown would wait 5 s, then terminate


def test_in_the_loading_process_itself_an_unreleased_slot_is_an_error():
    ring = SharedRing(workers=0, slots=1, shape=(ROWS, 4, 4, 3))
    ring.claim(0, 0, ROWS)
    with pytest.raises(RuntimeError, match="block 1 asked for before block 0 was released"):
        ring.claim(0, 1, ROWS)
    ring.release(0)
    assert ring.claim(0, 1, 2).shape == (2, 4, 4, 3)
