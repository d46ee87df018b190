"""The `ray` section every stage config shares: where a stage's Ray work runs.

    ray:
      address: null       # null: start a local Ray for this run (or join $RAY_ADDRESS, set inside a Ray job)
                          # "auto": the cluster `ray start` runs on this machine; "HOST:6379" / "ray://HOST:10001"
      num_cpus: null      # logical CPUs of a local Ray this run starts (ignored when joining a cluster)
      in_process: null    # true: train (pretrain, finetune) or recaption in this process; false: on Ray Train
                          # workers; null: the stage's default

Only types live here (no Ray import): `clipdense.ray_session` is what joins or starts Ray.
"""
from __future__ import annotations

import os
from typing import Annotated

from pydantic import AfterValidator, Field, model_validator

from clipdense.config.base import Config


class RayConfig(Config):
    address: str | None = Field(None, description="null: start a local Ray for this run, or join $RAY_ADDRESS "
                                "when set (Ray sets it inside a Ray job); 'auto': the cluster `ray start` runs on "
                                "this machine; 'HOST:PORT' or 'ray://HOST:10001': that cluster")
    num_cpus: int | None = Field(None, ge=1, description="logical CPUs of a local Ray this run starts "
                                 "(ignored when joining a cluster); null: the machine's cores")
    in_process: bool | None = Field(None, description="true: train in this process (no Ray Train workers; "
                                    "pretrain reads its data here too unless data.loader is ray); false: on Ray "
                                    "Train workers; null: the stage's default (pretrain: Ray Train; finetune: in this "
                                    "process unless train.scaling.num_workers > 1 or it runs as a Tune trial)")

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


def _not_in_process(cfg: RayConfig) -> RayConfig:
    if cfg.in_process:
        raise ValueError("in_process: true applies to training (pretrain, finetune) and recaption; this stage "
                         "always runs on Ray")
    return cfg


# The `ray` section of stages that always run on Ray (sweep: Ray Tune; demo: its sweep).
OnRayConfig = Annotated[RayConfig, AfterValidator(_not_in_process)]
