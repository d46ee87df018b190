"""Ray at the edge: the scopes that join or start Ray for a stage (its `ray:` section is `config.RayConfig`).

`ray_session(cfg.ray)` joins or starts Ray and shuts down only what it started: inside a process that already
runs Ray (a Tune trial, the demo's later steps, a test's cluster) it reuses it and leaves it running.
`data_context({...})` sets Ray Data's process-wide `DataContext` attributes for a block and restores them after.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

from clipdense.config import RayConfig


@contextlib.contextmanager
def ray_session(cfg: RayConfig | None = None, *, log_to_driver: bool | None = None) -> Iterator[bool]:
    """Join or start Ray for a block; yields whether this call connected (and so will shut down) Ray.

    Already initialised in this process: reused, left running. Else `cfg.target()` is joined (our connection
    closes on exit, the cluster keeps running) or a local Ray is started with `cfg.num_cpus` and stopped on exit.
    `log_to_driver`: print the workers' output here; default: when joining a cluster (a Ray job's log then shows
    its workers), not for a local Ray (keeps the console to the stage's own lines)."""
    import ray  # Ray loads when a stage enters it, not when it is imported (the GPU bench runs without Ray)

    cfg = cfg or RayConfig()
    if ray.is_initialized():
        yield False
        return
    target = cfg.target()
    if target:
        ray.init(address=target, log_to_driver=True if log_to_driver is None else log_to_driver)
    else:  # "local": a new Ray even when `ray start` runs on this machine (that one is address "auto")
        ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=False, log_to_driver=bool(log_to_driver))
    try:
        yield True
    finally:
        ray.shutdown()


@contextlib.contextmanager
def data_context(settings: dict[str, Any]) -> Iterator[Any]:
    """Set Ray Data `DataContext` attributes (dotted names, e.g. "execution_options.preserve_order") on the
    current context for a block, then restore them. Datasets created inside keep the settings: each copies the
    context when it is created."""
    from ray.data import DataContext  # as above: loaded on use

    ctx = DataContext.get_current()
    saved = []
    try:
        for name, value in settings.items():
            *path, attr = name.split(".")
            owner = ctx
            for part in path:
                owner = getattr(owner, part)
            saved.append((owner, attr, getattr(owner, attr)))
            setattr(owner, attr, value)
        yield ctx
    finally:
        for owner, attr, value in reversed(saved):
            setattr(owner, attr, value)


def cluster_cpus() -> int:
    """Logical CPUs of the Ray this process has joined (e.g. inside `ray_session`), at least 1."""
    import ray  # as above: loaded on use

    return max(1, int(ray.cluster_resources().get("CPU", 1)))
