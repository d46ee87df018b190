"""Segmentation metrics from a dataset-level confusion matrix (mmseg / torchmetrics definition)."""
from __future__ import annotations

import math

import torch

IGNORE = 255


class ConfusionMatrix:
    """Dataset-level K x K counts (rows = ground truth, cols = prediction); pixels labelled `ignore_index` are
    skipped."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE):
        self.k = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        pred, target = pred.reshape(-1).long().cpu(), target.reshape(-1).long().cpu()
        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        if target.numel() and (target.min() < 0 or target.max() >= self.k):
            raise ValueError(f"ground-truth label {int(target.max())} outside [0, {self.k})")
        self.mat += torch.bincount(target * self.k + pred, minlength=self.k * self.k).reshape(self.k, self.k)

    def merge(self, other: "ConfusionMatrix") -> None:
        self.mat += other.mat


def seg_metrics(mat: torch.Tensor, class_names: list[str] | None = None) -> dict:
    """mIoU = nanmean over classes of I/U summed over the dataset (classes absent from both gt and prediction are
    NaN and skipped), aAcc = pixel accuracy, mAcc = nanmean per-class recall; per-class IoU as a list (NaN -> None)."""
    mat = mat.double()
    tp = mat.diag()
    gt, pr = mat.sum(1), mat.sum(0)
    union = gt + pr - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
    acc = torch.where(gt > 0, tp / gt.clamp_min(1), torch.full_like(tp, float("nan")))
    total = mat.sum()
    out = {
        "mIoU": float(torch.nanmean(iou)) if (~iou.isnan()).any() else float("nan"),
        "aAcc": float(tp.sum() / total) if total > 0 else float("nan"),
        "mAcc": float(torch.nanmean(acc)) if (~acc.isnan()).any() else float("nan"),
        "IoU_per_class": [None if math.isnan(v) else float(v) for v in iou.tolist()],
    }
    if class_names:
        out["class_names"] = list(class_names)
    return out
