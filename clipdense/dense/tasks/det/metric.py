"""Detection metrics: COCO AP from torchmetrics (pycocotools backend), boxes and masks."""
from __future__ import annotations

import torch


def detection_meter(masks: bool = False):
    """torchmetrics' COCO AP (pycocotools backend) for boxes, or boxes and masks."""
    from torchmetrics.detection import MeanAveragePrecision

    return MeanAveragePrecision(iou_type=("bbox", "segm") if masks else "bbox", backend="pycocotools")


def detection_scalars(res: dict) -> dict:
    """torchmetrics' result -> floats (-1 = undefined, as COCO reports): box AP as `map`, `map_50`, ... (its
    `bbox_` prefix dropped, so one key means box AP for every head), mask AP as `segm_map`, ..."""
    return {(k[len("bbox_"):] if k.startswith("bbox_") else k): float(v) for k, v in res.items()
            if torch.is_tensor(v) and v.numel() == 1}


def detection_metrics(preds: list[dict], targets: list[dict], masks: bool = False) -> dict:
    """COCO AP of whole lists of torchvision-style predictions and targets (see `detection_scalars`)."""
    metric = detection_meter(masks)
    metric.update(preds, targets)
    return detection_scalars(metric.compute())
