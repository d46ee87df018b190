"""Backbones (open_clip ViT, timm hierarchical), necks, layer-wise lr decay groups, sliding-window inference."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from clipdense.config import ConfigError, load_config
from clipdense.dense.backbones import create_backbone, default_block_indices
from clipdense.dense.base_config import BackboneConfig
from clipdense.dense.config import FinetuneConfig
from clipdense.dense.inference import slide_predict, whole_predict
from clipdense.dense.necks import Feature2Pyramid
from clipdense.dense.optim import layer_decay_param_groups
from clipdense.dense.tasks.depth.head import DepthModel
from clipdense.dense.tasks.seg.head import SegModel
from clipdense.models.open_clip_adapter import interpolated_pos_embed


@pytest.fixture(scope="module")
def clip_tiny():
    return create_backbone(BackboneConfig(name="clip-tiny"))


def test_clip_vit_pyramid_shapes_any_size(clip_tiny):
    assert clip_tiny.provenance["kind"] == "open_clip" and clip_tiny.provenance["params"] > 0
    assert clip_tiny.out_channels == [64] * 4 and clip_tiny.out_indices == [0, 0, 1, 1]
    for h, w in [(64, 64), (64, 96), (128, 32)]:
        feats = clip_tiny(torch.randn(2, 3, h, w))
        assert [tuple(f.shape) for f in feats] == [(2, 64, h // s, w // s) for s in (4, 8, 16, 32)]
    grid = tuple(clip_tiny.vit.grid_size)
    assert interpolated_pos_embed(clip_tiny.vit, grid) is clip_tiny.vit.positional_embedding  # native grid: untouched
    assert interpolated_pos_embed(clip_tiny.vit, (3, 5)).shape == (1 + 15, 64)


def test_default_block_indices():
    assert default_block_indices(12) == [3, 5, 7, 11]
    assert default_block_indices(24) == [7, 11, 15, 23]
    assert default_block_indices(2) == [0, 0, 1, 1]
    assert len(set(default_block_indices(8))) == 4


def test_feature2pyramid_ops_for_patch16():
    ops = Feature2Pyramid(8, [4, 2, 1, 0.5]).ops
    assert [type(m).__name__ for m in ops[0]] == ["ConvTranspose2d", "BatchNorm2d", "GELU", "ConvTranspose2d"]
    assert isinstance(ops[1][0], nn.ConvTranspose2d) and isinstance(ops[2], nn.Identity)
    assert isinstance(ops[3], nn.MaxPool2d)
    out = Feature2Pyramid(8, [4, 2, 1, 0.5])([torch.randn(1, 8, 4, 4)] * 4)
    assert [o.shape[-1] for o in out] == [16, 8, 4, 2]


def test_timm_hierarchical_backbone():
    bb = create_backbone(BackboneConfig(name="test_convnext", drop_path=0.1))
    assert bb.provenance["kind"] == "timm" and bb.provenance["drop_path"] == 0.1
    feats = bb(torch.randn(1, 3, 64, 96))
    assert [f.shape[1] for f in feats] == bb.out_channels
    assert [tuple(f.shape[-2:]) for f in feats] == [(64 // s, 96 // s) for s in (4, 8, 16, 32)]
    ids = [bb.layer_id(n) for n, _ in bb.named_parameters()]
    assert ids[0] == 0 and ids == sorted(ids) and max(ids) < bb.num_layers - 1


def test_layer_decay_groups_follow_the_mmseg_rule(clip_tiny):
    model = SegModel(clip_tiny, num_classes=3, channels=16, aux_channels=8)
    groups = layer_decay_param_groups(model, clip_tiny, weight_decay=0.05, layer_decay=0.5)
    n = clip_tiny.num_layers  # 2 blocks: ids 0 (embed), 1, 2 (blocks), 3 (neck + heads)
    assert n == 4
    scale = {(g["layer_id"], g["weight_decay"] > 0): g["lr_scale"] for g in groups}
    assert scale[(0, True)] == 0.5 ** 3 and scale[(1, True)] == 0.5 ** 2 and scale[(3, True)] == 1.0
    names = {name: g for g in groups for name in g["param_names"]}
    assert names["backbone.vit.positional_embedding"]["weight_decay"] == 0.0
    assert names["backbone.vit.transformer.resblocks.1.mlp.c_fc.bias"]["weight_decay"] == 0.0
    assert names["backbone.vit.transformer.resblocks.1.mlp.c_fc.weight"]["layer_id"] == 2
    assert names["decode_head.classifier.weight"]["lr_scale"] == 1.0
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    torch.optim.AdamW(groups, lr=1e-3)  # the groups are valid optimizer input


def test_vit_drop_path_is_stochastic_in_training_only():
    bb = create_backbone(BackboneConfig(name="clip-tiny", drop_path=0.5))
    x = torch.randn(4, 3, 32, 32)
    bb.train()
    torch.manual_seed(0)
    a = bb(x)[2]
    torch.manual_seed(1)
    b = bb(x)[2]
    assert not torch.allclose(a, b)
    bb.eval()
    assert torch.allclose(bb(x)[2], bb(x)[2])


def test_open_clip_checkpoint_is_loaded(tmp_path):
    from clipdense.models.registry import create_clip

    clip = create_clip("clip-tiny")
    path = tmp_path / "tiny.pt"
    torch.save({"state_dict": clip.state_dict()}, path)
    bb = create_backbone(BackboneConfig(name="clip-tiny", checkpoint=str(path)))
    assert torch.equal(bb.vit.conv1.weight, clip.visual.conv1.weight)
    assert bb.provenance["checkpoint"] == str(path)
    with pytest.raises(ConfigError, match="not found"):
        create_backbone(BackboneConfig(name="clip-tiny", checkpoint=str(tmp_path / "missing.pt")))
    with pytest.raises(ConfigError, match="neither"):
        create_backbone(BackboneConfig(name="no-such-model"))


def test_sliding_window_averages_overlaps_exactly():
    img = torch.rand(1, 3, 37, 50)
    double = lambda x: x * 2  # noqa: E731 - a pointwise "model": any window layout must give back 2 * img
    out = slide_predict(double, img, crop=(16, 16), stride=(11, 11), batch=3)
    assert torch.allclose(out, img * 2)
    small = torch.rand(1, 3, 10, 12)  # smaller than the crop: padded, then cropped back
    assert torch.allclose(slide_predict(double, small, crop=(16, 16), stride=(11, 11)), small * 2)
    assert whole_predict(lambda x: x[:, :1] + x.shape[-1], small).shape == (1, 1, 10, 12)
    assert float(whole_predict(lambda x: x[:, :1] * 0 + x.shape[-1], small).max()) == 32.0  # padded to /32


def test_models_predict_at_input_size(clip_tiny):
    seg = SegModel(clip_tiny, num_classes=4, channels=16, aux_channels=8).eval()
    img = torch.randint(0, 255, (1, 3, 64, 96), dtype=torch.uint8)
    assert seg.predict(img).shape == (1, 4, 64, 96)
    seg.train()
    assert set(seg(torch.cat([img, img]))) == {"seg", "aux"}
    depth = DepthModel(clip_tiny, max_depth=10.0, channels=16).eval()
    d = depth.predict(img)
    assert d.shape == (1, 64, 96) and float(d.min()) > 0 and float(d.max()) < 10


def test_depth_bins_give_the_weighted_mean_bin_centre(clip_tiny):
    """DINOv2's linear depth probe: relu(score) + 0.1, normalised, weights the bin centres."""
    model = DepthModel(clip_tiny, max_depth=10.0, kind="linear", bins=4, min_depth=1.0).eval()
    clf = model.decode_head.classifier
    assert clf.out_channels == 4
    nn.init.zeros_(clf.weight)
    with torch.no_grad():
        clf.bias.copy_(torch.tensor([-5.0, 0.0, 0.0, 0.9]))  # weights 0.1, 0.1, 0.1, 1.0 over centres 1, 4, 7, 10
    d = model.predict(torch.randint(0, 255, (2, 3, 32, 48), dtype=torch.uint8))
    assert d.shape == (2, 32, 48)
    assert torch.allclose(d, torch.full_like(d, (0.1 * 1 + 0.1 * 4 + 0.1 * 7 + 1.0 * 10) / 1.3))
    with torch.no_grad():
        clf.bias.zero_()  # no preference: the middle of the range
    assert torch.allclose(model.predict(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)), torch.tensor(5.5))


def test_one_depth_bin_is_a_config_error():
    with pytest.raises(ConfigError, match="head.depth_bins"):
        load_config(FinetuneConfig, None, ["task=depth", "head.depth_bins=1"])
    assert load_config(FinetuneConfig, None, ["task=depth", "head.depth_bins=256"]).head.depth_bins == 256


@pytest.mark.slow
def test_mobileclip_open_clip_timm_tower():
    """open_clip's MobileCLIP image tower is a timm MCi model (`.visual.trunk`): a 4-stage pyramid."""
    bb = create_backbone(BackboneConfig(name="MobileCLIP-S1", drop_path=0.1))
    assert bb.provenance["kind"] == "open_clip" and bb.out_channels == [64, 128, 256, 512]
    assert bb.provenance["drop_path"] == 0.1  # retrofitted into the built timm trunk
    feats = bb(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape[-2:]) for f in feats] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    groups = layer_decay_param_groups(bb, bb, weight_decay=0.05, layer_decay="auto", min_lr_scale=1e-3)
    assert {g["layer_id"] for g in groups} == set(range(13))  # stem + 12 stage-level ids (a bare trunk: no head)
    assert min(g["lr_scale"] for g in groups) == pytest.approx(0.9 ** 13)
