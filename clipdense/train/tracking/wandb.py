"""Weights & Biases: a run per training run (its local folder under `<out_dir>/wandb`), the resolved config, every
metric with its step, and the export as a model artefact. `mode: offline` needs no network (`wandb sync` later)."""
from __future__ import annotations

from pathlib import Path

from clipdense.train.tracking.config import WandbConfig, require


class WandbTracker:
    name = "wandb"

    def __init__(self, cfg: WandbConfig, out_dir: Path, run_id: str, params: dict):
        wandb = require("wandb", "tracking.wandb")
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, mode=cfg.mode, dir=str(out_dir),
                              name=cfg.run_name or out_dir.name, id=None, config=params, reinit="create_new")
        self._wandb = wandb

    def log(self, scalars: dict, step: int) -> None:
        self.run.log(scalars, step=step)

    def artifacts(self, path: Path) -> None:
        art = self._wandb.Artifact(f"{path.name}-{self.run.id}", type="model")
        art.add_dir(str(path))
        self.run.log_artifact(art)

    def close(self) -> None:
        self.run.finish()
