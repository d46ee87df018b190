"""What a dense task supplies to the generic `DenseTask` (dense/task.py): its config class, datasets, model head,
collate, loss, evaluator and default metric. One subclass per task package (tasks/<task>/task.py), registered in
`tasks.TASKS`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import default_collate

from clipdense.dense.base_config import FinetuneBase


class TaskKind:
    name: str = ""
    config: type[FinetuneBase] = FinetuneBase
    metric: tuple[str, str] = ("", "max")  # (metric key in metrics.json, "max" | "min"): the sweep's default
    min_batch_per_rank: int = 2  # decoders with BatchNorm need two images per worker (SyncBatchNorm on multi-GPU)

    def train_dataset(self, cfg):
        raise NotImplementedError

    def eval_dataset(self, cfg):
        raise NotImplementedError

    def img_size(self, cfg) -> list[int] | None:
        """The input grid a ViT's position table is resized to at build time (None: keep the stored one)."""
        return cfg.data.crop_size

    def neck(self, cfg) -> str:
        """How a plain ViT's one-stride maps become a pyramid (backbones.create_backbone's `neck`)."""
        return "feature2pyramid"

    def build_model(self, cfg, backbone: nn.Module, train_set) -> nn.Module:
        raise NotImplementedError

    def collate(self, items: list[dict]):
        return default_collate(items)

    def loss(self, model: nn.Module, batch, cfg, device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def batch_size(self, batch) -> int:
        return int(batch["img"].shape[0])

    def evaluate(self, model: nn.Module, dataset, cfg, device: torch.device, save_dir=None) -> dict:
        raise NotImplementedError

    def head_name(self, cfg) -> str:
        return cfg.head.kind


def write_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
