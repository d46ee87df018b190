"""Object detection / instance segmentation as a task (`DetTask`): the COCO reader, boxes and, for Mask R-CNN,
masks from polygons and RLE, with a flip or ViTDet's large-scale jitter (dataset.py); torchvision Faster / Mask
R-CNN on the backbone's pyramid (head.py), trained by their own losses (no loss module); COCO AP from
torchmetrics (metric.py: `map*` = boxes, `segm_map*` = masks); predictions are a COCO results JSON (boxes, RLE
masks), re-scored by pycocotools' COCOeval in `rescore_det`."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import torch

from clipdense.dense.tasks.base import TaskKind
from clipdense.dense.tasks.det.config import DetFinetune
from clipdense.dense.tasks.det.dataset import COCODetection
from clipdense.dense.tasks.det.head import build_detector
from clipdense.dense.tasks.det.metric import detection_meter, detection_scalars

MASK_THRESHOLD = 0.5  # torchvision's mask probabilities -> binary masks (its own visualisation uses 0.5 too)


def rle(mask: np.ndarray) -> dict:
    """A binary H x W mask as COCO's compressed RLE with a str `counts` (JSON-ready)."""
    from pycocotools import mask as mask_utils

    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")}


def coco_results(dataset, outputs: list[tuple[int, dict]]) -> list[dict]:
    """torchvision detections -> COCO results rows (original category ids, xywh boxes, RLE masks if present)."""
    rows = []
    for image_id, det in outputs:
        masks = det.get("masks")
        for k, (box, label, score) in enumerate(zip(det["boxes"].tolist(), det["labels"].tolist(),
                                                    det["scores"].tolist())):
            x1, y1, x2, y2 = box
            row = {"image_id": int(image_id), "category_id": int(dataset.cat_ids[label - 1]),
                   "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                   "score": round(float(score), 5)}
            if masks is not None:
                row["segmentation"] = rle(masks[k].numpy())
            rows.append(row)
    return rows


@torch.no_grad()
def evaluate_det(model, dataset, cfg: DetFinetune, device, save_dir: str | Path | None = None) -> dict:
    """COCO AP (torchmetrics, pycocotools backend) over the validation images: boxes, and masks for Mask R-CNN."""
    with_masks = cfg.head.kind == "mask_rcnn"
    meter = detection_meter(with_masks)
    rows = []
    for i in range(len(dataset)):
        item = dataset[i]
        det = model([item["img"].to(device).float() / 255.0])[0]
        det = {k: v.cpu() if k == "labels" else v.float().cpu() for k, v in det.items()}
        if with_masks:
            det["masks"] = det["masks"][:, 0] > MASK_THRESHOLD
        t = item["target"]
        target = {k: t[k] for k in ("boxes", "labels", "iscrowd", "area")}
        if with_masks:
            target["masks"] = t["masks"].bool()
        meter.update([det], [target])  # per image: torchmetrics keeps masks as RLE, not full-size tensors
        if save_dir is not None:  # rows per image: masks become RLE at once
            rows.extend(coco_results(dataset, [(int(t["image_id"]), det)]))
    out = detection_scalars(meter.compute())
    out["images"] = len(dataset)
    if save_dir is not None:
        path = Path(save_dir) / "detections.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows))
    return out


def rescore_det(results_json, annotation_json, image_ids: list[int] | None = None, iou_type: str = "bbox") -> dict:
    """COCOeval on a saved results JSON: {"map", "map_50", "map_75"} (pycocotools' stats[0:3]) for `iou_type`
    "bbox" or "segm", over `image_ids` (default: every image of the annotation file)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotation_json))
        rows = json.loads(Path(results_json).read_text())
        if not rows:
            return {"map": 0.0, "map_50": 0.0, "map_75": 0.0}
        ev = COCOeval(gt, gt.loadRes(rows), iou_type)
        if image_ids is not None:
            ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"map": float(ev.stats[0]), "map_50": float(ev.stats[1]), "map_75": float(ev.stats[2])}


class DetTask(TaskKind):
    name, config, metric = "det", DetFinetune, ("map", "max")
    min_batch_per_rank = 1  # no BatchNorm: LayerNorm pyramid and heads

    def _dataset(self, cfg: DetFinetune, train: bool):
        d = cfg.data
        masks = cfg.head.kind == "mask_rcnn"
        if train:
            return COCODetection(d.root, d.train_split, train=True, fraction=d.fraction, subset_seed=d.seed,
                                 aug_seed=cfg.train.seed, masks=masks, lsj_size=d.lsj_size, lsj_scale=d.lsj_scale)
        return COCODetection(d.root, d.val_split, train=False, max_images=d.max_eval_images, masks=masks)

    def train_dataset(self, cfg):
        return self._dataset(cfg, True)

    def eval_dataset(self, cfg):
        return self._dataset(cfg, False)

    def img_size(self, cfg: DetFinetune):
        # LSJ: every input is the lsj_size square; else torchvision resizes per image and the table stays as built
        return [cfg.data.lsj_size] * 2 if cfg.data.lsj_size else None

    def neck(self, cfg) -> str:
        return "vitdet"

    def build_model(self, cfg: DetFinetune, backbone, train_set):
        return build_detector(backbone, train_set.num_classes, cfg.head, cfg.data.lsj_size)

    def collate(self, items: list[dict]) -> dict:
        return {"images": [it["img"] for it in items], "targets": [it["target"] for it in items]}

    def loss(self, model, batch, cfg, device):
        images = [im.to(device).float() / 255.0 for im in batch["images"]]
        targets = [{k: v.to(device) for k, v in t.items()} for t in batch["targets"]]
        losses = model(images, targets)
        return sum(losses.values()), {k: float(v.detach()) for k, v in losses.items()}

    def batch_size(self, batch) -> int:
        return len(batch["images"])

    def evaluate(self, model, dataset, cfg, device, save_dir=None) -> dict:
        return evaluate_det(model, dataset, cfg, device, save_dir)
