"""TensorBoard: event files under `<out_dir>/tensorboard`, every metric with its step."""
from __future__ import annotations

from pathlib import Path

from clipdense.train.tracking.config import require


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, out_dir: Path, run_id: str, params: dict):
        tb = require("torch.utils.tensorboard", "tracking.tensorboard")
        self.writer = tb.SummaryWriter(log_dir=str(out_dir / "tensorboard"))

    def log(self, scalars: dict, step: int) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def artifacts(self, path: Path) -> None:
        pass

    def close(self) -> None:
        self.writer.close()
