"""Elastic runs see the cluster change within `train.scaling.resize_interval_s`.

Ray Train's elastic policy counts the workers that fit from the reservations of Ray's autoscaling coordinator (a
detached actor that Ray Data and Ray Train share), and that actor re-reads the cluster's nodes only on its own
20 s tick. So a node that joins or dies is seen up to 20 s late, whatever `elastic_resize_monitor_interval_s` says:
a group that could start waits for the tick, a group that lost a node first retries the old size. While an elastic
run is fitted, the driver asks the coordinator to re-read the cluster every `resize_interval_s` (when shorter than
its tick): the same re-read it does on its tick, asked for as a caller that holds no request.
"""
from __future__ import annotations

import contextlib
import logging
import threading

log = logging.getLogger(__name__)

COORDINATOR = ("AutoscalingCoordinator", "AutoscalingCoordinator")   # Ray 2.60's (name, namespace) of the actor
COORDINATOR_TICK_S = 20.0                                            # its own re-read interval
REQUESTER = "clipdense-resize-ticks"                                 # holds no request: reads nothing back


def _tick_once(state: dict) -> None:
    import ray

    if state.get("actor") is None:
        try:
            state["actor"] = ray.get_actor(COORDINATOR[0], namespace=COORDINATOR[1])
        except ValueError:  # Ray Train creates it when its controller starts
            return
    ray.get(state["actor"].get_reserved_resources.remote(REQUESTER, recompute=True), timeout=5)


@contextlib.contextmanager
def coordinator_ticks(interval_s: float, elastic: bool):
    """While the block runs, every `interval_s` ask Ray's autoscaling coordinator to re-read the cluster (an
    elastic run whose interval is shorter than the coordinator's tick); otherwise nothing."""
    if not elastic or interval_s >= COORDINATOR_TICK_S:
        yield
        return
    stop, state = threading.Event(), {}

    def loop():
        while not stop.wait(max(interval_s, 0.5)):
            try:
                _tick_once(state)
            except Exception as e:  # noqa: BLE001  (a missed nudge only delays a resize to the actor's own tick)
                state["actor"] = None
                log.debug("autoscaling coordinator re-read failed: %s", e)

    thread = threading.Thread(target=loop, name="clipdense-resize-ticks", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)
