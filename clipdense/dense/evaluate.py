"""Evaluation of each task over its validation set, optionally saving predictions in the dataset's own format
(segmentation PNGs in the annotation convention, 16-bit depth PNGs in mm, a COCO results JSON), and re-scoring
saved predictions with the same metrics so anyone can check a run."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clipdense.dense.config import FinetuneConfig
from clipdense.dense.datasets.ade import list_pairs, load_label, reduce_zero_label, restore_zero_label
from clipdense.dense.datasets.common import read_png, read_rgb
from clipdense.dense.datasets.nyu import load_depth, read_list
from clipdense.dense.heads import resize
from clipdense.dense.inference import slide_predict, tta_predict, tta_views, whole_predict
from clipdense.dense.metrics import ConfusionMatrix, DepthMeter, depth_errors, detection_metrics, seg_metrics
from clipdense.errors import DataError


def _write_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@torch.no_grad()
def evaluate_seg(model, dataset, cfg: FinetuneConfig, device, save_dir: str | Path | None = None) -> dict:
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
            _write_png(Path(save_dir) / item["name"], restore_zero_label(p) if cfg.data.reduce_zero_label else p)
    out = seg_metrics(cm.mat)
    out["images"] = len(dataset)
    out["tta"] = ev.tta
    return out


@torch.no_grad()
def evaluate_depth(model, dataset, cfg: FinetuneConfig, device, save_dir: str | Path | None = None) -> dict:
    """BTS protocol: whole-image prediction, per-image errors in the (scaled) Eigen crop, averaged over images."""
    meter = DepthMeter()
    views = tta_views(cfg.eval.tta)  # none or flip (the config refuses ms_flip for depth)
    for i in range(len(dataset)):
        item = dataset[i]
        img = item["img"].unsqueeze(0).to(device)
        pred = tta_predict(lambda x: whole_predict(model.predict, x), img, views, softmax=False)
        pred = pred[0].float().cpu().numpy()
        meter.update(depth_errors(pred, item["depth"].numpy(), cfg.data.min_depth, cfg.data.max_depth))
        if save_dir is not None:
            mm = np.clip(np.round(pred * 1000.0), 0, 65535).astype(np.uint16)
            _write_png(Path(save_dir) / item["name"], mm)
    return {**meter.compute(), "tta": cfg.eval.tta}


def coco_results(dataset, outputs: list[tuple[int, dict]]) -> list[dict]:
    """torchvision detections -> COCO results rows (original category ids, xywh boxes)."""
    rows = []
    for image_id, det in outputs:
        for box, label, score in zip(det["boxes"].tolist(), det["labels"].tolist(), det["scores"].tolist()):
            x1, y1, x2, y2 = box
            rows.append({"image_id": int(image_id), "category_id": int(dataset.cat_ids[label - 1]),
                         "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                         "score": round(float(score), 5)})
    return rows


@torch.no_grad()
def evaluate_det(model, dataset, cfg: FinetuneConfig, device, save_dir: str | Path | None = None) -> dict:
    """COCO box mAP (torchmetrics, pycocotools backend) over the validation images."""
    preds, targets, outputs = [], [], []
    for i in range(len(dataset)):
        item = dataset[i]
        det = model([item["img"].to(device).float() / 255.0])[0]
        det = {k: v.float().cpu() if k != "labels" else v.cpu() for k, v in det.items()}
        t = item["target"]
        preds.append(det)
        targets.append({"boxes": t["boxes"], "labels": t["labels"], "iscrowd": t["iscrowd"], "area": t["area"]})
        outputs.append((int(t["image_id"]), det))
    out = detection_metrics(preds, targets)
    out["images"] = len(dataset)
    if save_dir is not None:
        path = Path(save_dir) / "detections.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(coco_results(dataset, outputs)))
    return out


EVALUATORS = {"seg": evaluate_seg, "depth": evaluate_depth, "det": evaluate_det}


# ---- re-scoring saved predictions (no model needed) ----

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


def rescore_det(results_json, annotation_json, image_ids: list[int] | None = None) -> dict:
    """COCOeval on a saved results JSON: {"map", "map_50", "map_75"} (pycocotools' stats[0:3]), over `image_ids`
    (default: every image of the annotation file)."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotation_json))
        rows = json.loads(Path(results_json).read_text())
        if not rows:
            return {"map": 0.0, "map_50": 0.0, "map_75": 0.0}
        ev = COCOeval(gt, gt.loadRes(rows), "bbox")
        if image_ids is not None:
            ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"map": float(ev.stats[0]), "map_50": float(ev.stats[1]), "map_75": float(ev.stats[2])}
