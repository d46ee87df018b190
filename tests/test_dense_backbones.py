"""Backbone building: the position table resized once to the finetune crop, weights through `backbone.checkpoint`
(timm state dict / safetensors file, open_clip local-dir export), `backbone.model_kwargs`, trunk-only param counts."""
from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from clipdense.config import ConfigError
from clipdense.dense.backbones import create_backbone
from clipdense.dense.base_config import BackboneConfig
from clipdense.models import open_clip_adapter as oca
from clipdense.models.export import export_open_clip_dir
from clipdense.models.registry import create_clip


def test_vit_position_table_is_resized_once_to_the_crop(monkeypatch, tmp_path):
    torch.manual_seed(0)
    clip = create_clip("clip-tiny")  # 64 px, patch 8: an 8x8 table
    original = clip.visual.positional_embedding.detach().clone()
    expected = oca.interpolated_pos_embed(clip.visual, (12, 16)).detach().clone()
    path = tmp_path / "clip.pt"
    torch.save({"state_dict": clip.state_dict()}, path)
    bb = create_backbone(BackboneConfig(name="clip-tiny", checkpoint=str(path)), img_size=(96, 128)).eval()
    vit = bb.vit
    assert tuple(vit.grid_size) == (12, 16) and vit.positional_embedding.shape == (1 + 12 * 16, 64)
    assert torch.allclose(vit.positional_embedding, expected)  # bicubic resize of the pretrained table, once
    assert not torch.equal(vit.positional_embedding[1:9], original[1:9])
    params = dict(bb.named_parameters())
    assert params["vit.positional_embedding"] is vit.positional_embedding and vit.positional_embedding.requires_grad

    x = torch.randn(2, 3, 96, 128)
    calls = []
    real = oca.interpolated_pos_embed
    monkeypatch.setattr(oca, "interpolated_pos_embed", lambda *a: calls.append(a) or real(*a))
    with torch.no_grad():
        feats = bb(x)
        # open_clip's own forward, which adds the stored table as is
        ref = vit.forward_intermediates(x, indices=sorted(set(bb.out_indices)), intermediates_only=True,
                                        stop_early=True)["image_intermediates"]
    assert not calls, "a crop-size forward must not interpolate the table"
    ref = dict(zip(sorted(set(bb.out_indices)), ref))
    assert torch.allclose(feats[2], bb.neck([ref[i] for i in bb.out_indices])[2], atol=1e-6)

    with torch.no_grad():  # whole-image evaluation at another size interpolates from the trained table
        other = bb(torch.randn(1, 3, 64, 80))
    assert calls and tuple(calls[-1][1]) == (8, 10)
    assert [tuple(f.shape[-2:]) for f in other] == [(16, 20), (8, 10), (4, 5), (2, 2)]


def test_crop_not_multiple_of_patch_is_a_config_error():
    with pytest.raises(ConfigError, match="crop_size"):
        create_backbone(BackboneConfig(name="clip-tiny"), img_size=(100, 128))


def test_timm_vit_is_built_at_the_crop():
    bb = create_backbone(BackboneConfig(name="test_vit"), img_size=(96, 128))  # patch 16: a 6x8 grid
    assert bb.model.pos_embed.shape[1] == bb.model.num_prefix_tokens + 6 * 8
    assert [tuple(f.shape[-2:]) for f in bb(torch.randn(1, 3, 96, 128))] == [(24, 32), (12, 16), (6, 8), (3, 4)]
    assert [tuple(f.shape[-2:]) for f in bb(torch.randn(1, 3, 64, 64))][2] == (4, 4)  # other sizes still work


@pytest.mark.parametrize("name,fmt", [("test_vit", "pth"), ("test_convnext", "safetensors")])
def test_timm_weights_file_loads_through_checkpoint(tmp_path, name, fmt):
    torch.manual_seed(1)
    src = timm.create_model(name).eval()
    sd = src.state_dict()
    path = tmp_path / f"w.{fmt}"
    if fmt == "pth":
        torch.save({"state_dict": sd}, path)  # a training checkpoint wrapping the state dict
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    bb = create_backbone(BackboneConfig(name=name, checkpoint=str(path))).eval()
    fresh = create_backbone(BackboneConfig(name=name)).eval()
    x = torch.randn(1, 3, 64, 64)
    indices = bb.out_indices
    with torch.no_grad():
        ref = src.forward_intermediates(x, indices=indices, intermediates_only=True)
        got = bb.model.forward_intermediates(x, indices=indices, intermediates_only=True)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ref, got))
        assert not torch.allclose(fresh.model.forward_intermediates(x, indices=indices, intermediates_only=True)[-1],
                                  ref[-1])
    assert bb.provenance["checkpoint"] == str(path)


def test_timm_local_dir_and_bad_weights_are_one_line_errors(tmp_path):
    src = timm.create_model("test_convnext")
    folder = tmp_path / "timm_dir"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(folder / "model.safetensors"))
    bb = create_backbone(BackboneConfig(name="test_convnext", checkpoint=f"local-dir:{folder}"))
    assert torch.equal(bb.model.stem[0].weight, src.stem[0].weight)
    with pytest.raises(ConfigError, match="folder not found"):
        create_backbone(BackboneConfig(name="test_convnext", checkpoint=f"local-dir:{tmp_path / 'nope'}"))
    wrong = tmp_path / "vit.pth"
    torch.save(timm.create_model("test_vit").state_dict(), wrong)
    with pytest.raises(ConfigError, match="checkpoint"):
        create_backbone(BackboneConfig(name="test_convnext", checkpoint=str(wrong)))


def test_open_clip_local_dir_export_loads(tmp_path):
    clip = create_clip("clip-tiny")
    folder = export_open_clip_dir(clip, "clip-tiny", tmp_path / "export" / "open_clip")
    bb = create_backbone(BackboneConfig(name="clip-tiny", checkpoint=f"local-dir:{folder}")).eval()
    assert torch.equal(bb.vit.conv1.weight, clip.visual.conv1.weight)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = clip.visual.forward_intermediates(x, indices=[0], intermediates_only=True)["image_intermediates"][0]
        assert bb.out_indices[1] == 0 and bb.strides[1] == 8  # patch 8: level 1 is block 0's map as is
        assert torch.allclose(bb(x)[1], ref, atol=1e-6)
    with pytest.raises(ConfigError, match="image tower"):
        create_backbone(BackboneConfig(name="clip-demo", checkpoint=f"local-dir:{folder}"))
    with pytest.raises(ConfigError, match="open_clip_config.json"):
        create_backbone(BackboneConfig(name="clip-tiny", checkpoint=f"local-dir:{tmp_path}"))


def test_model_kwargs_reach_timm():
    """timm's Swin rejects other sizes unless built at them (`img_size`); a tiny Swin stands in for Swin-L."""
    kw = {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]}
    swin = BackboneConfig(name="swin_tiny_patch4_window7_224", model_kwargs=kw)
    with pytest.raises(AssertionError):
        create_backbone(swin)(torch.randn(1, 3, 128, 128))
    bb = create_backbone(swin.model_copy(update={"model_kwargs": {**kw, "img_size": 128}}))
    feats = bb(torch.randn(1, 3, 128, 128))
    assert [f.shape[1] for f in feats] == [16, 32, 64, 128] and feats[0].shape[-1] == 32
    with pytest.raises(ConfigError, match="model_kwargs"):
        create_backbone(BackboneConfig(name="test_vit", model_kwargs={"no_such_arg": 1}))
    with pytest.raises(ConfigError, match="model_kwargs"):
        create_backbone(BackboneConfig(name="clip-tiny", model_kwargs={"img_size": 128}))


def test_provenance_params_count_the_trunk_only():
    for name in ("clip-tiny", "test_vit", "test_convnext"):
        bb = create_backbone(BackboneConfig(name=name))
        trunk = bb.vit if hasattr(bb, "vit") else bb.model
        assert bb.provenance["params"] == sum(p.numel() for p in trunk.parameters())
        neck = sum(p.numel() for p in bb.neck.parameters()) if bb.neck is not None else 0
        assert bb.provenance["neck_params"] == neck
        assert bb.provenance["params"] + neck == sum(p.numel() for p in bb.parameters())
    assert create_backbone(BackboneConfig(name="test_vit")).provenance["neck_params"] > 0  # Feature2Pyramid



def test_report_shows_each_backbones_trunk_params(tmp_path):
    """metrics.json records the trunk count (provenance `params`); the report's table reads it per backbone."""
    import csv
    import json

    from clipdense.sweep.report import ReportConfig, run

    counts = {}
    for bb_name, model in (("big", "test_vit"), ("small", "test_convnext")):
        prov = create_backbone(BackboneConfig(name=model)).provenance
        counts[bb_name] = prov["params"]
        for f, v in ((0.5, 0.3), (1.0, 0.4)):
            d = tmp_path / "trials" / "seg" / bb_name / f"f{f:g}" / "s0"
            d.mkdir(parents=True)
            (d / "metrics.json").write_text(json.dumps({"task": "seg", "metrics": {"mIoU": v}, "backbone": prov}))
    run(ReportConfig(results_dir=str(tmp_path), reference="big", bootstrap=10, quiet=True))
    md = (tmp_path / "report.md").read_text()
    assert "| backbone | trunk params |" in md
    assert f"| small | {counts['small'] / 1e3:.1f}k | 0.5 |" in md and f"| big | {counts['big'] / 1e3:.1f}k |" in md
    with open(tmp_path / "report.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["backbone"]: int(r["trunk_params"]) for r in rows} == counts


def test_frozen_trunk_keeps_its_stored_table():
    bb = create_backbone(BackboneConfig(name="clip-tiny", frozen=True), img_size=(96, 128))
    assert tuple(bb.vit.grid_size) == (8, 8)  # nothing trains: no resized copy, the same values by interpolation
    assert [tuple(f.shape[-2:]) for f in bb(torch.randn(1, 3, 96, 128))][1] == (12, 16)


def test_timm_weights_from_the_hf_cache(tmp_path, monkeypatch):
    """`hf-hub:<repo>` reads the HF cache offline (e.g. timm/vit_base_patch16_224.mae); a tiny model stands in,
    placed in the cache's own layout (refs/main -> snapshots/<rev>/model.safetensors)."""
    import huggingface_hub.constants as hf_constants

    repo = tmp_path / "models--local--tiny-convnext"
    rev = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    (repo / "snapshots" / rev).mkdir(parents=True)
    src = timm.create_model("test_convnext")
    weights = repo / "snapshots" / rev / "model.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(weights))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    bb = create_backbone(BackboneConfig(name="test_convnext", checkpoint="hf-hub:local/tiny-convnext"))
    assert torch.equal(bb.model.stem[0].weight, src.stem[0].weight)
    with pytest.raises(ConfigError, match="hf-hub:local/not-cached"):
        create_backbone(BackboneConfig(name="test_convnext", checkpoint="hf-hub:local/not-cached"))


def test_timm_vit_weights_at_another_size_are_resampled_once(tmp_path):
    """A timm ViT checkpoint from its own size (MAE: 224) loads into the model built at the crop: timm resamples
    the table on load, and that table is what trains."""
    from timm.layers import resample_abs_pos_embed

    src = timm.create_model("test_vit")  # 160 px, patch 16: a 10x10 table
    torch.save(src.state_dict(), path := tmp_path / "vit.pth")
    bb = create_backbone(BackboneConfig(name="test_vit", checkpoint=str(path)), img_size=(96, 128))
    expected = resample_abs_pos_embed(src.pos_embed.detach(), (6, 8), num_prefix_tokens=src.num_prefix_tokens)
    assert bb.model.pos_embed.shape == expected.shape and torch.allclose(bb.model.pos_embed, expected, atol=1e-5)
    assert torch.equal(bb.model.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
