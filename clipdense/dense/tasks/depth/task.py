"""Monocular depth as a task (`DepthTask`): the NYU reader with the Toolbox's pipeline (dataset.py), UperNet /
linear / DPT decoder, by regression or DINOv2's bins (head.py), SigLoss (loss.py), and the BTS metrics (metric.py)
on whole images with flip TTA (`evaluate_depth`); predictions are 16-bit PNGs in millimetres, re-scored by
`rescore_depth`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from clipdense.dense.dataset_common import read_png, read_rgb
from clipdense.dense.inference import tta_predict, tta_views, whole_predict
from clipdense.dense.tasks.base import TaskKind, write_png
from clipdense.dense.tasks.depth.config import DepthFinetune
from clipdense.dense.tasks.depth.dataset import NYUEval, NYUTrain, load_depth, read_list
from clipdense.dense.tasks.depth.head import DepthModel
from clipdense.dense.tasks.depth.loss import sig_loss
from clipdense.dense.tasks.depth.metric import DepthMeter, depth_errors


@torch.no_grad()
def evaluate_depth(model, dataset, cfg: DepthFinetune, device, save_dir: str | Path | None = None) -> dict:
    """BTS protocol: whole-image prediction, per-image errors in the (scaled) Eigen crop, averaged over images."""
    meter = DepthMeter()
    views = tta_views(cfg.eval.tta)
    for i in range(len(dataset)):
        item = dataset[i]
        img = item["img"].unsqueeze(0).to(device)
        pred = tta_predict(lambda x: whole_predict(model.predict, x), img, views, softmax=False)
        pred = pred[0].float().cpu().numpy()
        meter.update(depth_errors(pred, item["depth"].numpy(), cfg.data.min_depth, cfg.data.max_depth))
        if save_dir is not None:
            mm = np.clip(np.round(pred * 1000.0), 0, 65535).astype(np.uint16)
            write_png(Path(save_dir) / item["name"], mm)
    return {**meter.compute(), "tta": cfg.eval.tta}


def rescore_depth(pred_dir, root, list_file: str, subdir: str = "", min_depth: float = 1e-3,
                  max_depth: float = 10.0) -> dict:
    """Score 16-bit mm prediction PNGs (same relative paths as the ground truth) with the BTS protocol."""
    meter = DepthMeter()
    for rgb_path, depth_path, _ in read_list(root, list_file, subdir):
        pred_path = Path(pred_dir) / depth_path.relative_to(Path(root))
        if not pred_path.is_file():
            continue
        gt = load_depth(depth_path, read_rgb(rgb_path), rgb_path)
        pred = read_png(pred_path, "prediction").astype(np.float32) / 1000.0
        meter.update(depth_errors(pred, gt, min_depth, max_depth))
    return meter.compute()


class DepthTask(TaskKind):
    name, config, metric = "depth", DepthFinetune, ("rmse", "min")

    def train_dataset(self, cfg: DepthFinetune):
        d = cfg.data
        return NYUTrain(d.root, d.train_list, d.train_dir, d.crop_size, d.photometric, d.fraction, d.seed,
                        cfg.train.seed, nyu_crop=d.nyu_crop, rotate_degrees=d.rotate_degrees, color_aug=d.color_aug)

    def eval_dataset(self, cfg: DepthFinetune):
        d = cfg.data
        return NYUEval(d.root, d.test_list, d.test_dir, d.max_eval_images)

    def neck(self, cfg: DepthFinetune) -> str:
        return "dpt" if cfg.head.kind == "dpt" else "feature2pyramid"

    def build_model(self, cfg: DepthFinetune, backbone, train_set):
        h = cfg.head
        return DepthModel(backbone, cfg.data.max_depth, h.channels, tuple(h.pool_scales), h.dropout, h.kind,
                          h.depth_bins, cfg.data.min_depth)

    def loss(self, model, batch, cfg: DepthFinetune, device):
        pred = model(batch["img"].to(device, non_blocking=True))["depth"].float()
        loss = sig_loss(pred, batch["depth"].to(device, non_blocking=True), cfg.data.min_depth, cfg.data.max_depth,
                        cfg.head.depth_loss_weight)
        return loss, {}

    def evaluate(self, model, dataset, cfg, device, save_dir=None) -> dict:
        return evaluate_depth(model, dataset, cfg, device, save_dir)
