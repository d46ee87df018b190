"""The driver's side of watching a run on Ray: a Ray Train run's progress in the user's terminal.

A worker's stdout ends in Ray's worker logs (a local Ray runs with `log_to_driver=False`), and Ray Train's
`UserCallback.after_report` runs in its controller actor, not in the driver: neither reaches the terminal. So the
driver makes a Ray queue (a zero-CPU actor), rank 0's `RunWatchers` puts every record and tracker warning in it,
and a thread here prints them through `Progress` (a tqdm bar when the driver's stdout is a TTY).
This is the Ray half of watching a run; train/tracking stays free of Ray.
"""
from __future__ import annotations

import contextlib
import threading
import warnings
from typing import Any, Iterator

from clipdense.train.tracking import Progress, TrackingConfig


@contextlib.contextmanager
def driver_progress(tracking: TrackingConfig | None, total_steps: int) -> Iterator[Any]:
    """Yields the queue rank 0 relays to (None when `tracking.progress` is off); prints what arrives until the
    block ends, then what is still queued."""
    mode = (tracking or TrackingConfig()).progress
    if mode == "off":
        yield None
        return
    from ray.util.queue import Empty, Queue

    queue = Queue(actor_options={"num_cpus": 0})  # a full cluster must not keep the mailbox from starting
    progress = Progress(mode, total_steps)
    done = threading.Event()

    def pump() -> None:
        while True:
            try:
                item = queue.get(timeout=0.5)
            except Empty:
                if done.is_set():
                    return
                continue
            except Exception:  # Ray went away under us: nothing more will arrive
                return
            if "warning" in item:
                warnings.warn(item["warning"], stacklevel=1)
            else:
                progress.write(item)

    thread = threading.Thread(target=pump, name="clipdense-progress", daemon=True)
    thread.start()
    try:
        yield queue
    finally:
        done.set()
        thread.join(timeout=30)
        progress.close()
        with contextlib.suppress(Exception):
            queue.shutdown()
