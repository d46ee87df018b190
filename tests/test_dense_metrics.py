"""Dense metrics against hand-computed cases and torchmetrics; SigLoss on a hand case."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassJaccardIndex

from clipdense.dense.tasks.depth.loss import sig_loss
from clipdense.dense.tasks.depth.metric import DepthMeter, depth_errors, eigen_crop_box
from clipdense.dense.tasks.det.metric import detection_metrics
from clipdense.dense.tasks.seg.loss import seg_loss
from clipdense.dense.tasks.seg.metric import ConfusionMatrix, seg_metrics


def test_seg_metrics_2x2_hand_case():
    pred = torch.tensor([[0, 1], [1, 1]])
    gt = torch.tensor([[0, 1], [0, 255]])  # one ignored pixel
    cm = ConfusionMatrix(2)
    cm.update(pred, gt)
    assert cm.mat.tolist() == [[1, 1], [0, 1]]
    m = seg_metrics(cm.mat)
    # class 0: I=1, U=2 ; class 1: I=1, U=2
    assert m["IoU_per_class"] == [0.5, 0.5]
    assert m["mIoU"] == pytest.approx(0.5)
    assert m["aAcc"] == pytest.approx(2 / 3)
    assert m["mAcc"] == pytest.approx((0.5 + 1.0) / 2)


def test_seg_metrics_match_torchmetrics_dataset_level():
    g = torch.Generator().manual_seed(0)
    k = 5
    cm = ConfusionMatrix(k)
    macro = MulticlassJaccardIndex(num_classes=k, ignore_index=255, average="macro")
    per_class = MulticlassJaccardIndex(num_classes=k, ignore_index=255, average=None)
    for b in range(3):  # images of different class mixes: dataset-level sums differ from a per-image mean
        pred = torch.randint(0, 3 + b, (2, 9, 11), generator=g)
        gt = torch.randint(0, 4, (2, 9, 11), generator=g)
        gt[:, :2] = 255
        cm.update(pred, gt)
        macro.update(pred, gt)
        per_class.update(pred, gt)
    m = seg_metrics(cm.mat)
    assert m["mIoU"] == pytest.approx(float(macro.compute()), abs=1e-6)
    ref = per_class.compute().tolist()
    for ours, theirs in zip(m["IoU_per_class"], ref):
        assert ours == pytest.approx(theirs, abs=1e-6) if ours is not None else theirs == 0.0


def test_absent_class_is_skipped_not_zero():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 1]), torch.tensor([0, 1]))
    m = seg_metrics(cm.mat)
    assert m["IoU_per_class"] == [1.0, 1.0, None]
    assert m["mIoU"] == 1.0


def test_depth_errors_hand_case():
    gt = np.array([[1.0, 2.0], [4.0, 0.0]])  # 0 = invalid
    pred = np.array([[1.0, 1.0], [8.0, 5.0]])
    e = depth_errors(pred, gt, eigen_crop=False)
    assert e["abs_rel"] == pytest.approx((0 + 0.5 + 1.0) / 3)
    assert e["sq_rel"] == pytest.approx((0 + 1 / 2 + 16 / 4) / 3)
    assert e["rmse"] == pytest.approx(math.sqrt(17 / 3))
    assert e["rmse_log"] == pytest.approx(math.log(2) * math.sqrt(2 / 3))
    assert e["log10"] == pytest.approx(2 / 3 * math.log10(2))
    assert e["delta1"] == pytest.approx(1 / 3) and e["delta3"] == pytest.approx(1 / 3)


def test_depth_errors_clamp_and_range():
    gt = np.array([[5.0, 12.0, 0.0005]])  # 12 m and 0.5 mm are outside (1e-3, 10): not scored
    e = depth_errors(np.array([[50.0, 1.0, 1.0]]), gt, eigen_crop=False)
    assert e["rmse"] == pytest.approx(5.0)  # the 50 m prediction is clamped to 10
    e = depth_errors(np.array([[np.nan, 1.0, 1.0]]), np.array([[5.0, 0.0, 0.0]]), eigen_crop=False)
    assert e["abs_rel"] == pytest.approx(abs(5.0 - 1e-3) / 5.0)


def test_eigen_crop_box_and_scaling():
    assert eigen_crop_box(480, 640) == (45, 471, 41, 601)
    assert eigen_crop_box(960, 1280) == (90, 942, 82, 1202)
    assert eigen_crop_box(240, 320) == (23, 236, 21, 301)
    gt = np.full((480, 640), 2.0)
    pred = np.full((480, 640), 2.0)
    pred[:45] = 9.0  # wrong only outside the crop
    assert depth_errors(pred, gt)["rmse"] == 0.0
    assert depth_errors(pred, gt, eigen_crop=False)["rmse"] > 0.0


def test_depth_meter_averages_over_images_not_pixels():
    meter = DepthMeter()
    meter.update(depth_errors(np.array([[2.0]]), np.array([[1.0]]), eigen_crop=False))  # abs_rel 1, 1 pixel
    meter.update(depth_errors(np.full((4, 4), 1.0), np.full((4, 4), 1.0), eigen_crop=False))  # abs_rel 0, 16 px
    meter.update(depth_errors(np.array([[1.0]]), np.array([[0.0]]), eigen_crop=False))  # no valid pixel
    out = meter.compute()
    assert out["abs_rel"] == pytest.approx(0.5)
    assert out["images"] == 2 and out["images_without_valid_pixels"] == 1


def test_sig_loss_hand_case_and_invalid_pixels():
    gt = torch.tensor([[1.0, 2.0, 0.0], [3.0, 4.0, 0.0]])
    pred = gt * 2 + torch.tensor([[0, 0, 7.0], [0, 0, 3.0]])  # junk where gt is invalid
    loss = sig_loss(pred, gt, weight=10.0, eps=0.0)
    g = math.log(2)
    assert float(loss) == pytest.approx(10 * math.sqrt(g * g - 0.85 * g * g), rel=1e-5)
    assert float(sig_loss(gt.clone(), gt, eps=0.0)) == pytest.approx(0.0, abs=1e-4)
    pred.requires_grad_(True)
    sig_loss(pred, gt).backward()
    assert pred.grad[:, 2].abs().sum() == 0


def test_seg_loss_ignores_255_and_weights_aux():
    logits = torch.randn(1, 3, 4, 4)
    target = torch.full((1, 8, 8), 255)
    target[0, :4] = 1
    main, parts = seg_loss({"seg": logits}, target, aux_weight=0.4)
    both, parts2 = seg_loss({"seg": logits, "aux": logits}, target, aux_weight=0.4)
    assert float(both) == pytest.approx(1.4 * float(main))
    assert "loss_aux" in parts2 and "loss_aux" not in parts


def test_detection_metrics_perfect_and_miss():
    target = [{"boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 40, 40]]), "labels": torch.tensor([1, 2])}]
    perfect = [{"boxes": target[0]["boxes"].clone(), "labels": torch.tensor([1, 2]), "scores": torch.tensor([.9, .8])}]
    assert detection_metrics(perfect, target)["map"] == pytest.approx(1.0)
    wrong = [{"boxes": target[0]["boxes"].clone(), "labels": torch.tensor([2, 1]), "scores": torch.tensor([.9, .8])}]
    assert detection_metrics(wrong, target)["map"] == pytest.approx(0.0)
