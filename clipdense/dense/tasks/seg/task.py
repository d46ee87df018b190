"""Semantic segmentation as a task (`SegTask`): the ADE reader (dataset.py), UperNet / linear decoder + auxiliary
FCN (head.py), cross-entropy (loss.py), and dataset-level mIoU (metric.py) with slide / whole inference and
test-time augmentation (`evaluate_seg`); predictions are PNGs in the annotation convention, re-scored by
`rescore_seg`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from clipdense.config import DataError
from clipdense.dense.dataset_common import read_png, read_rgb
from clipdense.dense.heads import resize
from clipdense.dense.inference import slide_predict, tta_predict, tta_views, whole_predict
from clipdense.dense.tasks.base import TaskKind, write_png
from clipdense.dense.tasks.seg.config import SegFinetune
from clipdense.dense.tasks.seg.dataset import (
    ADEEval,
    ADETrain,
    list_pairs,
    load_label,
    reduce_zero_label,
    restore_zero_label,
)
from clipdense.dense.tasks.seg.head import SegModel
from clipdense.dense.tasks.seg.loss import seg_loss
from clipdense.dense.tasks.seg.metric import ConfusionMatrix, seg_metrics


@torch.no_grad()
def evaluate_seg(model, dataset, cfg: SegFinetune, device, save_dir: str | Path | None = None) -> dict:
    """Dataset-level confusion matrix over all validation images (logits resized back to the label size).
    `eval.tta`: flip or ms_flip average the views' class probabilities (`inference.tta_predict`)."""
    ev = cfg.eval
    cm = ConfusionMatrix(cfg.data.num_classes)
    views = tta_views(ev.tta, ev.tta_scales)

    def predict(x):
        if ev.mode == "slide":
            return slide_predict(model.predict, x, tuple(ev.crop_size), tuple(ev.stride), ev.batch_size)
        return whole_predict(model.predict, x)

    for i in range(len(dataset)):
        item = dataset[i]
        img = item["img"].unsqueeze(0).to(device)
        logits = tta_predict(predict, img, views, softmax=True)
        label = item["label"]
        pred = resize(logits.float(), label.shape[-2:]).argmax(1)[0].cpu()
        cm.update(pred, label)
        if save_dir is not None:
            p = pred.numpy().astype(np.uint8)
            write_png(Path(save_dir) / item["name"], restore_zero_label(p) if cfg.data.reduce_zero_label else p)
    out = seg_metrics(cm.mat)
    out["images"] = len(dataset)
    out["tta"] = ev.tta
    return out


def rescore_seg(pred_dir, root, split: str = "validation", num_classes: int = 150, reduce_zero: bool = True) -> dict:
    """Score prediction PNGs (annotation convention, same file names) against the split's annotations."""
    cm = ConfusionMatrix(num_classes)
    for img_path, ann_path in list_pairs(root, split):
        pred_path = Path(pred_dir) / ann_path.name
        if not pred_path.is_file():
            continue
        label = load_label(ann_path, read_rgb(img_path), img_path, num_classes, reduce_zero)
        pred = read_png(pred_path, "prediction")
        pred = reduce_zero_label(pred) if reduce_zero else pred
        if pred.shape != label.shape or ((pred >= num_classes) & (pred != 255)).any():
            raise DataError(f"{pred_path}: prediction does not match {ann_path.name} (size or label range)")
        cm.update(torch.from_numpy(pred.astype(np.int64)), torch.from_numpy(label))
    return seg_metrics(cm.mat)


class SegTask(TaskKind):
    name, config, metric = "seg", SegFinetune, ("mIoU", "max")

    def train_dataset(self, cfg: SegFinetune):
        d = cfg.data
        return ADETrain(d.root, d.train_split, d.num_classes, d.reduce_zero_label, d.crop_size, d.scale,
                        d.ratio_range, d.cat_max_ratio, d.photometric, d.fraction, d.seed, cfg.train.seed)

    def eval_dataset(self, cfg: SegFinetune):
        d = cfg.data
        return ADEEval(d.root, d.val_split, d.num_classes, d.reduce_zero_label, cfg.eval.test_scale,
                       d.max_eval_images)

    def build_model(self, cfg: SegFinetune, backbone, train_set):
        h = cfg.head
        return SegModel(backbone, cfg.data.num_classes, h.channels, tuple(h.pool_scales), h.dropout, h.aux_channels,
                        aux=h.aux_weight > 0 and h.kind == "upernet", kind=h.kind)

    def loss(self, model, batch, cfg: SegFinetune, device):
        out = model(batch["img"].to(device, non_blocking=True))
        return seg_loss(out, batch["label"].to(device, non_blocking=True), cfg.head.aux_weight)

    def evaluate(self, model, dataset, cfg, device, save_dir=None) -> dict:
        return evaluate_seg(model, dataset, cfg, device, save_dir)
