"""Pure parts of pretraining: caption policies, per-sample crops, retrieval metrics (no Ray)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from clipdense.eval.metrics import retrieval_metrics
from clipdense.pretrain.captions import missing_for, pick_batch, pick_captions, sample_rng
from clipdense.pretrain.crops import crop_box, random_resized_crops

SYN = ["a red circle", "circle that is red", "red round thing"]


def test_policies_pick_the_right_texts():
    rng = lambda: sample_rng(0, 0, "k1")  # noqa: E731
    assert pick_captions("real", "web text", SYN, rng()) == ["web text"]
    assert pick_captions("synthetic", "web text", SYN, rng())[0] in SYN
    real, syn = pick_captions("both", "web text", SYN, rng())
    assert real == "web text" and syn in SYN
    assert pick_captions("mix", "web text", SYN, rng(), mix_p=0.0) == ["web text"]
    assert pick_captions("mix", "web text", SYN, rng(), mix_p=1.0)[0] in SYN
    with pytest.raises(ValueError, match="unknown caption policy"):
        pick_captions("best", "x", SYN, rng())


def test_draws_are_pure_functions_of_seed_epoch_key():
    keys = [f"k{i}" for i in range(200)]
    reals, syns = ["r"] * 200, [SYN] * 200
    a = pick_batch("synthetic", keys, reals, syns, seed=3, epoch=1)
    assert a == pick_batch("synthetic", keys, reals, syns, seed=3, epoch=1)
    assert a != pick_batch("synthetic", keys, reals, syns, seed=3, epoch=2)   # a new draw each epoch
    assert set(a[0]) == set(SYN)                                               # every caption gets drawn
    mixed = pick_batch("mix", keys, reals, syns, seed=0, epoch=0, mix_p=0.25)[0]
    frac_syn = sum(t != "r" for t in mixed) / len(mixed)
    assert 0.1 < frac_syn < 0.4
    both = pick_batch("both", keys[:5], reals[:5], syns[:5], seed=0, epoch=0)
    assert len(both) == 2 and both[0] == ["r"] * 5


def test_missing_captions_are_reasons_not_crashes():
    assert missing_for("real", None, SYN) == "no_caption"
    assert missing_for("synthetic", "x", None) == "no_synthetic_captions"
    assert missing_for("both", "x", ["", " "]) == "no_synthetic_captions"
    assert missing_for("mix", "x", SYN) is None and missing_for("real", "x", None) is None


def test_crop_boxes_follow_open_clip_train_geometry():
    for i in range(50):
        x1, y1, x2, y2 = crop_box(np.random.default_rng(i), 64, 64)
        assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64
        area = (x2 - x1) * (y2 - y1) / 64 ** 2
        assert 0.85 <= area <= 1.0 and 3 / 4 - 0.05 <= (x2 - x1) / (y2 - y1) <= 4 / 3 + 0.05


def test_full_box_crop_is_identity_and_partial_crop_resizes():
    imgs = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8)
    same = random_resized_crops(list(imgs.numpy()), [(0, 0, 16, 16), (0, 0, 16, 16)], 16)
    assert torch.equal(same, imgs.permute(0, 3, 1, 2))
    part = random_resized_crops(list(imgs.numpy()), [(0, 0, 8, 8), (8, 8, 16, 16)], 16)
    assert part.shape == (2, 3, 16, 16) and not torch.equal(part, imgs.permute(0, 3, 1, 2))


def test_retrieval_metrics():
    feats = torch.eye(8)
    perfect = retrieval_metrics(feats, feats)
    assert perfect["i2t_R@1"] == perfect["t2i_R@1"] == perfect["mean_R@1"] == 1.0
    shifted = retrieval_metrics(feats, feats.roll(1, dims=0))
    assert shifted["i2t_R@1"] == shifted["t2i_R@1"] == 0.0 and shifted["i2t_R@5"] == 1.0
