"""Dataset readers (ADE20k, NYUv2/BTS, COCO) and their construction from a FinetuneConfig."""
from __future__ import annotations

from clipdense.dense.config import FinetuneConfig
from clipdense.dense.datasets.ade import ADEEval, ADETrain, reduce_zero_label, restore_zero_label
from clipdense.dense.datasets.coco import COCODetection
from clipdense.dense.datasets.common import subset_indices
from clipdense.dense.datasets.nyu import NYUEval, NYUTrain

__all__ = ["ADEEval", "ADETrain", "COCODetection", "NYUEval", "NYUTrain", "build_eval_dataset",
           "build_train_dataset", "reduce_zero_label", "restore_zero_label", "subset_indices"]


def build_train_dataset(cfg: FinetuneConfig):
    d = cfg.data
    if cfg.task == "seg":
        return ADETrain(d.root, d.train_split or "training", d.num_classes, d.reduce_zero_label, d.crop_size,
                        d.scale, d.ratio_range, d.cat_max_ratio, d.photometric, d.fraction, d.seed, cfg.train.seed)
    if cfg.task == "depth":
        return NYUTrain(d.root, d.train_list, d.train_dir, d.crop_size, d.photometric, d.fraction, d.seed,
                        cfg.train.seed, nyu_crop=d.nyu_crop, rotate_degrees=d.rotate_degrees, color_aug=d.color_aug)
    return COCODetection(d.root, d.train_split or "train2017", train=True, fraction=d.fraction,
                         subset_seed=d.seed, aug_seed=cfg.train.seed)


def build_eval_dataset(cfg: FinetuneConfig):
    d = cfg.data
    if cfg.task == "seg":
        return ADEEval(d.root, d.val_split or "validation", d.num_classes, d.reduce_zero_label, cfg.eval.test_scale,
                       d.max_eval_images)
    if cfg.task == "depth":
        return NYUEval(d.root, d.test_list, d.test_dir, d.max_eval_images)
    return COCODetection(d.root, d.val_split or "val2017", train=False, max_images=d.max_eval_images)
