"""What the fit probe asks of a task: its unaugmented train and eval sets, patch targets, and its metrics.

- seg: a patch's target is the share of each class among its labelled pixels (one-hot labels area-pooled to the
  patch grid; patches with no labelled pixel are left out); a prediction's class scores are upsampled (bilinear) to
  the label's size and argmaxed; metrics are the seg task's dataset-level confusion-matrix ones (`seg_metrics`).
  `mIoU_atypical`: when `<data.root>/atypical/<val_split>/<annotation stem>.png` masks exist (uint8, 1 = a pixel of
  an object whose colour is not its class's typical colour), the same mIoU computed on those pixels only: a
  confusion matrix over the masked, labelled pixels of every eval image, IoU_c = TP_c / (TP_c + FP_c + FN_c) within
  them, averaged over the classes present there in label or prediction. Without the folder the key is absent.
- depth: a patch's target is the mean log-depth of its valid pixels (min_depth < d < max_depth); the prediction is
  upsampled in log space, exponentiated, and scored by the depth task's BTS metrics (per image, Eigen crop).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clipdense.config import ConfigError
from clipdense.dense.base_config import FinetuneBase
from clipdense.dense.dataset_common import read_png
from clipdense.dense.heads import resize
from clipdense.dense.tasks.depth.dataset import NYUEval
from clipdense.dense.tasks.depth.metric import DepthMeter, depth_errors
from clipdense.dense.tasks.seg.dataset import ADEEval, ade_base
from clipdense.dense.tasks.seg.metric import IGNORE, ConfusionMatrix, seg_metrics


class SegTargets:
    name, label_key, outputs_per_class = "seg", "label", True

    def sets(self, cfg: FinetuneBase):
        d = cfg.data
        return (ADEEval(d.root, d.train_split, d.num_classes, d.reduce_zero_label, test_scale=None),
                ADEEval(d.root, d.val_split, d.num_classes, d.reduce_zero_label, test_scale=None))

    def ids(self, dataset) -> list[str]:
        return [p[0].name for p in dataset.pairs]

    def outputs(self, cfg: FinetuneBase) -> int:
        return cfg.data.num_classes

    def patch_targets(self, label: torch.Tensor, grid, cfg: FinetuneBase) -> tuple[torch.Tensor, torch.Tensor]:
        """([cells, K] class shares, [cells] has a labelled pixel)."""
        k = cfg.data.num_classes
        lab = label.long().clone()
        lab[lab == IGNORE] = k
        onehot = F.one_hot(lab, k + 1)[..., :k].permute(2, 0, 1)[None].float()
        pooled = F.adaptive_avg_pool2d(onehot, tuple(grid))[0].flatten(1).T
        labelled = pooled.sum(1)
        return pooled / labelled.clamp_min(1e-12)[:, None], labelled > 0

    def atypical_masks(self, cfg: FinetuneBase, dataset) -> list[torch.Tensor] | None:
        d = cfg.data
        folder = next((b / "atypical" / d.val_split for b in (Path(d.root), ade_base(d.root))
                       if (b / "atypical" / d.val_split).is_dir()), None)
        if folder is None:
            return None
        return [torch.from_numpy(read_png(folder / ann.name, "atypical mask") == 1) for _, ann in dataset.pairs]

    def score(self, maps: torch.Tensor, labels: list[torch.Tensor], cfg: FinetuneBase, masks) -> dict:
        cm, cm_atypical = ConfusionMatrix(cfg.data.num_classes), ConfusionMatrix(cfg.data.num_classes)
        for i, label in enumerate(labels):
            pred = resize(maps[i:i + 1].float(), label.shape[-2:]).argmax(1)[0]
            cm.update(pred, label)
            if masks is not None:
                cm_atypical.update(pred[masks[i]], label[masks[i]])
        out = {**seg_metrics(cm.mat), "images": len(labels), "tta": "none"}
        if masks is not None:
            out["mIoU_atypical"] = seg_metrics(cm_atypical.mat)["mIoU"]
            out["atypical_pixels"] = int(cm_atypical.mat.sum())
        return out


class DepthTargets:
    name, label_key, outputs_per_class = "depth", "depth", False

    def sets(self, cfg: FinetuneBase):
        d = cfg.data
        return NYUEval(d.root, d.train_list, d.train_dir), NYUEval(d.root, d.test_list, d.test_dir)

    def ids(self, dataset) -> list[str]:
        return [str(r[0].relative_to(dataset.root)) for r in dataset.rows]

    def outputs(self, cfg: FinetuneBase) -> int:
        return 1

    def patch_targets(self, depth: torch.Tensor, grid, cfg: FinetuneBase) -> tuple[torch.Tensor, torch.Tensor]:
        """([cells, 1] mean log-depth of the valid pixels, [cells] has a valid pixel)."""
        valid = ((depth > cfg.data.min_depth) & (depth < cfg.data.max_depth)).float()
        logd = torch.log(depth.clamp_min(cfg.data.min_depth)) * valid
        pooled = F.adaptive_avg_pool2d(torch.stack([logd, valid])[None], tuple(grid))[0].flatten(1)
        return (pooled[0] / pooled[1].clamp_min(1e-12))[:, None], pooled[1] > 0

    def atypical_masks(self, cfg: FinetuneBase, dataset) -> None:
        return None

    def score(self, maps: torch.Tensor, labels: list[torch.Tensor], cfg: FinetuneBase, masks) -> dict:
        meter = DepthMeter()
        for i, gt in enumerate(labels):
            pred = torch.exp(resize(maps[i:i + 1].float(), gt.shape[-2:]))[0, 0]
            meter.update(depth_errors(pred.numpy(), gt.numpy(), cfg.data.min_depth, cfg.data.max_depth))
        return {**meter.compute(), "tta": "none"}


PROBE_TARGETS = {"seg": SegTargets(), "depth": DepthTargets()}


def probe_targets(cfg: FinetuneBase):
    if cfg.task not in PROBE_TARGETS:
        raise ConfigError(f"protocol fit: task {cfg.task!r} has no fitted probe (tasks: {', '.join(PROBE_TARGETS)})")
    return PROBE_TARGETS[cfg.task]


def as_label(item: dict, key: str) -> torch.Tensor:
    value = item[key]
    return value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))
