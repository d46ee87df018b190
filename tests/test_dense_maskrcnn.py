"""ViTDet's Mask R-CNN on tiny files in the real COCO layout (polygons + RLE + a crowd region): masks read as
pycocotools rasterises them, large-scale jitter keeps boxes and masks together, the simple feature pyramid and the
hierarchical FPN have the right shapes, the tiny config trains on CPU, and its saved COCO results JSON re-scores
to the same box and mask AP with pycocotools' COCOeval."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from dense_files import write_coco

from clipdense.config import ConfigError, DataError, configs_dir, load_config
from clipdense.dense import FinetuneConfig, run
from clipdense.dense.backbones import create_backbone
from clipdense.dense.base_config import BackboneConfig
from clipdense.dense.evaluate import rescore_det
from clipdense.dense.necks import LayerNorm2d, ViTDetRescale
from clipdense.dense.tasks.det.config import DetHead
from clipdense.dense.tasks.det.dataset import COCODetection, lsj
from clipdense.dense.tasks.det.head import build_detector


def test_masks_from_polygons_and_rle_match_the_boxes(tmp_path):
    root = write_coco(tmp_path / "coco", n_train=4, n_val=2, size=(48, 64), crowd=True)
    ds = COCODetection(root, "val2017", train=False, masks=True)
    anns = ds.coco.dataset["annotations"]
    assert any(isinstance(a["segmentation"], list) for a in anns) and any("counts" in a["segmentation"] for a in anns)
    for i in range(len(ds)):
        t = ds[i]["target"]
        assert t["masks"].dtype == torch.uint8 and tuple(t["masks"].shape[1:]) == (48, 64)
        for m, box, crowd in zip(t["masks"], t["boxes"], t["iscrowd"]):
            ys, xs = torch.nonzero(m, as_tuple=True)
            x1, y1, x2, y2 = box.tolist()
            assert abs(xs.min() - x1) <= 1 and abs(xs.max() + 1 - x2) <= 1 and abs(ys.min() - y1) <= 1, (box, crowd)
            assert int(m.sum()) >= 0.8 * (x2 - x1) * (y2 - y1)


def test_large_scale_jitter_keeps_boxes_and_masks_together():
    rng = np.random.default_rng(0)
    img = np.zeros((40, 80, 3), np.uint8)
    masks = np.zeros((2, 40, 80), np.uint8)
    masks[0, 5:25, 10:50] = 1
    masks[1, 30:38, 60:78] = 1
    boxes = np.array([[10, 5, 50, 25], [60, 30, 78, 38]], np.float32)
    for _ in range(20):
        out, b, m, kept = lsj(img, boxes, masks, 64, (0.5, 2.0), rng)
        assert out.shape[0] <= 64 and out.shape[1] <= 64 and m.shape[1:] == out.shape[:2] and len(b) == len(kept)
        for box, mask in zip(b, m):
            ys, xs = np.nonzero(mask)
            assert len(xs) and abs(xs.min() - box[0]) <= 1.5 and abs(xs.max() + 1 - box[2]) <= 1.5
            assert abs(ys.min() - box[1]) <= 1.5 and abs(ys.max() + 1 - box[3]) <= 1.5


def test_vitdet_pyramid_is_the_last_block_rescaled():
    bb = create_backbone(BackboneConfig(name="clip-tiny"), neck="vitdet")  # width 64, patch 8: scales 2, 1, 1/2, 1/4
    assert bb.out_indices == [1, 1, 1, 1] and bb.out_channels == [32, 64, 64, 64]
    assert isinstance(bb.neck, ViTDetRescale)
    feats = bb(torch.rand(1, 3, 64, 64))
    assert [tuple(f.shape[1:]) for f in feats] == [(32, 16, 16), (64, 8, 8), (64, 4, 4), (64, 2, 2)]
    x4 = ViTDetRescale(64, [4, 2, 1, 0.5])  # ViT-B/16's scales: ConvT, LN, GELU, ConvT | ConvT | - | MaxPool
    assert [type(m).__name__ for m in x4.ops[0]] == ["ConvTranspose2d", "LayerNorm2d", "GELU", "ConvTranspose2d"]
    assert x4.out_channels == [16, 32, 64, 64]
    model = build_detector(bb, 3, DetHead(kind="mask_rcnn", fpn_channels=16, anchor_sizes=[8, 16, 32, 64, 128],
                                          representation_size=32))
    norms = [type(m) for m in model.backbone.proj.modules()] + [type(m) for m in model.roi_heads.box_head.modules()]
    assert LayerNorm2d in norms and torch.nn.BatchNorm2d not in norms
    assert sum(isinstance(m, LayerNorm2d) for m in model.roi_heads.box_head.modules()) == 4
    assert sum(isinstance(m, LayerNorm2d) for m in model.roi_heads.mask_head.modules()) == 4


def test_hierarchical_tower_goes_through_torchvision_fpn(tmp_path):
    from torchvision.ops import FeaturePyramidNetwork

    root = write_coco(tmp_path / "coco", n_train=2, n_val=1, size=(64, 64))
    bb = create_backbone(BackboneConfig(name="convnext_atto"), neck="vitdet")
    model = build_detector(bb, 3, DetHead(kind="mask_rcnn", fpn_channels=16, anchor_sizes=[8, 16, 32, 64, 128],
                                          representation_size=32, min_size=64, max_size=64))
    assert isinstance(model.backbone.fpn, FeaturePyramidNetwork)
    ds = COCODetection(root, "train2017", train=True, masks=True)
    items = [ds[0], ds[1]]
    losses = model([it["img"].float() / 255 for it in items], [it["target"] for it in items])
    assert {"loss_mask", "loss_box_reg", "loss_objectness"} <= set(losses) and all(torch.isfinite(v) for v in
                                                                                  losses.values())


def test_tiny_mask_rcnn_trains_and_results_json_rescores_with_cocoeval(tmp_path):
    root = write_coco(tmp_path / "coco", n_train=8, n_val=3, size=(64, 64), crowd=True)
    out, preds = tmp_path / "run", tmp_path / "preds"
    cfg = load_config(FinetuneConfig, configs_dir() / "finetune" / "shapes-maskrcnn-tiny.yaml",
                      [f"data.root={root}", f"out_dir={out}", f"save_predictions={preds}", "data.lsj_size=64",
                       "train.schedule.total_steps=12", "train.log_every=1", "train.checkpoint.keep=1",
                       "head.fpn_channels=16", "head.box_batch_size_per_image=32", "head.box_score_thresh=0.0"])
    assert cfg.head.kind == "mask_rcnn" and cfg.data.lsj_size == 64
    run(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    assert all("loss_mask" in r for r in rows if "loss" in r)
    record = json.loads((out / "metrics.json").read_text())
    assert record["head"] == "mask_rcnn" and record["task"] == "det"
    m = record["metrics"]
    assert m["images"] == 3 and -1 <= m["map"] <= 1 and -1 <= m["segm_map"] <= 1
    results = json.loads((preds / "detections.json").read_text())
    assert results and all(r["segmentation"]["size"] == [64, 64] and isinstance(r["segmentation"]["counts"], str)
                           for r in results)
    ann = root / "annotations" / "instances_val2017.json"
    box = rescore_det(preds / "detections.json", ann)
    mask = rescore_det(preds / "detections.json", ann, iou_type="segm")
    assert box["map"] == pytest.approx(max(m["map"], 0.0), abs=1e-6)
    assert mask["map"] == pytest.approx(max(m["segm_map"], 0.0), abs=1e-6)
    assert mask["map_50"] == pytest.approx(max(m["segm_map_50"], 0.0), abs=1e-6)
    assert box["map"] != mask["map"] or box["map_50"] != mask["map_50"]  # two evaluations, not one read twice


def test_mask_rcnn_without_segmentations_is_a_one_line_data_error(tmp_path):
    root = write_coco(tmp_path / "coco", n_train=2, n_val=1)
    path = root / "annotations" / "instances_train2017.json"
    doc = json.loads(path.read_text())
    del doc["annotations"][0]["segmentation"]
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"instances_train2017.json: annotation 1: no segmentation") as e:
        COCODetection(root, "train2017", train=True, masks=True)
    assert "\n" not in str(e.value)
    COCODetection(root, "train2017", train=True)  # boxes only: fine


def test_shipped_coco_recipe_is_vitdet():
    cfg = load_config(FinetuneConfig, configs_dir() / "finetune" / "coco-maskrcnn-vitb16.yaml")
    o, s = cfg.train.optim, cfg.train.schedule
    assert (cfg.head.kind, cfg.data.lsj_size, cfg.data.lsj_scale, cfg.data.batch_size) == \
        ("mask_rcnn", 1024, [0.1, 2.0], 64)
    assert (o.lr, o.weight_decay, o.layer_decay, cfg.backbone.drop_path, s.total_steps) == (1e-4, 0.1, 0.7, 0.1, 184375)
    assert load_config(FinetuneConfig, configs_dir() / "finetune" / "coco-det.yaml").head.kind == "faster_rcnn"
    with pytest.raises(ConfigError, match="head.depth_bins.*not supported for task det"):
        load_config(FinetuneConfig, configs_dir() / "finetune" / "coco-maskrcnn-vitb16.yaml", ["head.depth_bins=8"])
