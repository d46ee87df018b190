"""Where a stage's Ray work runs: the `ray` section every stage config shares, and the scopes that use it.

    ray:
      address: null       # null: start a local Ray for this run (or join $RAY_ADDRESS, set inside a Ray job)
                          # "auto": the cluster `ray start` runs on this machine; "HOST:6379" / "ray://HOST:10001"
      num_cpus: null      # logical CPUs of a local Ray this run starts (ignored when joining a cluster)
      in_process: null    # true: train in this process; false: on Ray Train workers; null: the stage's default

`ray_session(cfg.ray)` joins or starts Ray and shuts down only what it started: inside a process that already
runs Ray (a Tune trial, the demo's later steps, a test's cluster) it reuses it and leaves it running.
`data_context({...})` sets Ray Data's process-wide `DataContext` attributes for a block and restores them after.
"""
from __future__ import annotations

import contextlib
import os
from typing import Annotated, Any, Iterator

from pydantic import AfterValidator, Field, model_validator

from clipdense.config import Config

# Keys of earlier versions -> what replaced them (stage configs reject them with this hint).
OLD_KEYS = {
    "ray_address": "ray.address",
    "ray_num_cpus": "ray.num_cpus",
    "runner": "ray.in_process (runner: local -> true, ray -> false, auto -> leave it out)",
}


class RayConfig(Config):
    address: str | None = Field(None, description="null: start a local Ray for this run, or join $RAY_ADDRESS "
                                "when set (Ray sets it inside a Ray job); 'auto': the cluster `ray start` runs on "
                                "this machine; 'HOST:PORT' or 'ray://HOST:10001': that cluster")
    num_cpus: int | None = Field(None, ge=1, description="logical CPUs of a local Ray this run starts "
                                 "(ignored when joining a cluster); null: the machine's cores")
    in_process: bool | None = Field(None, description="true: train in this process (no Ray Train workers; "
                                    "pretrain still reads its data through Ray Data); false: on Ray Train workers; "
                                    "null: the stage's default (pretrain: Ray Train; finetune: in this process "
                                    "unless train.scaling.num_workers > 1 or it runs as a Tune trial)")

    @model_validator(mode="before")
    @classmethod
    def _old_form(cls, data):
        if isinstance(data, (str, bool)):  # pretrain's `ray: auto|local|off` (YAML reads `off` as false)
            raise ValueError("`ray` is a section now ({address, num_cpus, in_process}): `ray: off` becomes "
                             "`ray: {in_process: true}`; `auto`/`local` are the default (leave `ray` out)")
        return data

    def target(self) -> str | None:
        """The cluster to join, or None to start a local Ray. A dashboard URL in $RAY_ADDRESS (http://...) is for
        `clipdense submit`, not a cluster to join."""
        if self.address:
            return self.address
        env = os.environ.get("RAY_ADDRESS", "").strip()
        return env if env and not env.startswith(("http://", "https://")) else None


class StageConfig(Config):
    """Base of the stage configs that have a `ray` section: the keys it replaced fail with what replaced them."""

    @model_validator(mode="before")
    @classmethod
    def _old_ray_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for old, new in OLD_KEYS.items():
                if old in data:
                    raise ValueError(f"{old!r} was replaced by {new}")
        return data


def _not_in_process(cfg: RayConfig) -> RayConfig:
    if cfg.in_process:
        raise ValueError("in_process: true applies to training (pretrain, finetune); this stage always runs on Ray")
    return cfg


# The `ray` section of stages that always run on Ray (recaption: Ray Data; sweep: Ray Tune; demo: all of them).
OnRayConfig = Annotated[RayConfig, AfterValidator(_not_in_process)]


# Environment for every process of a run: this one and, through it, the workers of a local Ray it starts (they
# inherit it; cluster nodes get it from cluster/Dockerfile). THP_MEM_ALLOC_ENABLE: torch backs CPU allocations of
# >= 2 MB with transparent huge pages; a collated batch (64 x 3 x 224 x 224 float, 38 MB) is above glibc's mmap
# threshold, so each one is fresh memory and, in 4 KB pages, page-faulting it costs more than normalising it.
# torch reads it once, at its first allocation: set before torch is imported (the CLI's first step).
PROCESS_ENV = {"THP_MEM_ALLOC_ENABLE": "1"}


def apply_process_env() -> None:
    """PROCESS_ENV into os.environ where not set already (a user's own value wins)."""
    for name, value in PROCESS_ENV.items():
        os.environ.setdefault(name, value)


@contextlib.contextmanager
def ray_session(cfg: RayConfig | None = None, *, log_to_driver: bool | None = None) -> Iterator[bool]:
    """Join or start Ray for a block; yields whether this call connected (and so will shut down) Ray.

    Already initialised in this process: reused, left running. Else `cfg.target()` is joined (our connection
    closes on exit, the cluster keeps running) or a local Ray is started with `cfg.num_cpus` and stopped on exit.
    `log_to_driver`: print the workers' output here; default: when joining a cluster (a Ray job's log then shows
    its workers), not for a local Ray (keeps the console to the stage's own lines)."""
    import ray

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
    from ray.data import DataContext

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
