"""The DPT depth head (Monocular-Depth-Estimation-Toolbox recipe): reassemble from ViT blocks with the class-token
readout, fusion to full resolution, hierarchical towers feeding their own pyramid, the Toolbox's NYU augmentations,
the trunk's lr x0.1, and a tiny config that trains on CPU and records its head."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from dense_files import write_nyu
from torch import nn

from clipdense.config import ConfigError, DataError, configs_dir, load_config
from clipdense.dense import FinetuneConfig, run
from clipdense.dense.backbones import create_backbone, dpt_block_indices
from clipdense.dense.base_config import BackboneConfig
from clipdense.dense.evaluate import rescore_depth
from clipdense.dense.necks import Reassemble
from clipdense.dense.tasks.depth.dataset import NYUTrain, color_aug, random_rotate
from clipdense.dense.tasks.depth.head import DepthModel, DPTHead


def test_dpt_taps_and_reassemble_ops():
    assert dpt_block_indices(12) == [2, 5, 8, 11] and dpt_block_indices(2) == [0, 0, 1, 1]
    assert dpt_block_indices(24) == [5, 11, 17, 23]
    bb = create_backbone(BackboneConfig(name="test_vit"), img_size=(64, 96), neck="dpt")  # patch 16, 6 blocks
    assert bb.out_indices == dpt_block_indices(6) == [1, 2, 3, 5] and isinstance(bb.neck, Reassemble)
    ops = bb.neck.resample
    assert (ops[0].kernel_size, ops[0].stride) == ((4, 4), (4, 4)) and isinstance(ops[0], nn.ConvTranspose2d)
    assert (ops[1].kernel_size, ops[1].stride) == ((2, 2), (2, 2)) and isinstance(ops[2], nn.Identity)
    assert isinstance(ops[3], nn.Conv2d) and ops[3].stride == (2, 2)
    feats = bb(torch.randn(2, 3, 64, 96))
    assert [tuple(f.shape[1:]) for f in feats] == [(c, 64 // s, 96 // s) for c, s in zip(bb.out_channels,
                                                                                        (4, 8, 16, 32))]


def test_readout_projects_the_class_token():
    neck = Reassemble(16, [2, 1, 0.5, 0.25]).eval()
    maps = [torch.randn(1, 16, 4, 4) for _ in range(4)]
    cls = [torch.randn(1, 16) for _ in range(4)]
    a = neck(maps, cls)
    b = neck(maps, [c + 1 for c in cls])
    assert all(not torch.allclose(x, y) for x, y in zip(a, b))
    with torch.no_grad():  # readout = GELU(Linear([token, cls])): recompute level 1 (identity resample) by hand
        tok = maps[1].flatten(2).transpose(1, 2)
        r = neck.readout[1](torch.cat([tok, cls[1][:, None].expand_as(tok)], -1)).transpose(1, 2).reshape(1, 16, 4, 4)
        assert isinstance(neck.resample[1], nn.Identity)
        assert torch.allclose(a[1], neck.project[1](r), atol=1e-6)


def test_dpt_depth_model_full_resolution_and_hierarchical_pyramid():
    for name, neck_kind in (("clip-tiny", Reassemble), ("test_convnext", type(None))):
        bb = create_backbone(BackboneConfig(name=name), img_size=(64, 64), neck="dpt")
        assert isinstance(bb.neck, neck_kind)  # MCi / ConvNeXt / Swin feed their own 4 stages
        model = DepthModel(bb, max_depth=10.0, channels=16, kind="dpt", min_depth=1e-3)
        assert isinstance(model.decode_head, DPTHead)
        head_out = model.decode_head(bb(model.normalize(torch.rand(1, 3, 64, 64))))
        assert head_out.shape[-2:] == (64, 64)  # fusion ends at stride 2; the depth head's own x2: full size
        d = model(torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8))["depth"]
        assert d.shape == (2, 64, 64) and float(d.detach().min()) >= 1e-3
        d.mean().backward()  # the ReLU output starts alive: gradients reach the trunk
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in bb.parameters())


def test_dpt_is_a_depth_head_only():
    with pytest.raises(ConfigError, match="dpt"):
        load_config(FinetuneConfig, None, ["task=seg", "head.kind=dpt"])


def test_toolbox_augmentations():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    depth = rng.choice(np.array([1.5, 2.5, 7.0], dtype=np.float32), size=(48, 64))
    r_img, r_depth = random_rotate(img, depth, 2.5, np.random.default_rng(1), p=1.0)
    assert r_img.shape == img.shape and not np.array_equal(r_depth, depth)
    assert set(np.unique(r_depth)) <= {0.0, 1.5, 2.5, 7.0}  # nearest: no blended depths; corners invalid
    assert random_rotate(img, depth, 2.5, np.random.default_rng(1), p=0.0)[1] is depth
    c = color_aug(img, np.random.default_rng(2), p=1.0)
    assert c.dtype == np.uint8 and c.shape == img.shape and not np.array_equal(c, img)
    assert np.array_equal(c, color_aug(img, np.random.default_rng(2), p=1.0))  # a pure function of the rng


def test_nyu_crop_needs_nyu_frames(tmp_path):
    write_nyu(tmp_path, n_train=2, n_test=1, size=(48, 64))
    ds = NYUTrain(tmp_path, "nyudepthv2_train_files_with_gt.txt", crop=(32, 32), nyu_crop=True)
    with pytest.raises(DataError, match="480x640"):
        ds[0]
    big = tmp_path / "big"
    write_nyu(big, n_train=1, n_test=1, size=(480, 640))
    item = NYUTrain(big, "nyudepthv2_train_files_with_gt.txt", crop=(416, 544), nyu_crop=True, rotate_degrees=2.5,
                    color_aug=True, photometric_aug=False)[0]
    assert tuple(item["img"].shape) == (3, 416, 544) and tuple(item["depth"].shape) == (416, 544)


def test_tiny_dpt_config_trains_records_its_head_and_rescores(tmp_path):
    root = tmp_path / "nyu"
    write_nyu(root, n_train=8, n_test=2, size=(48, 64))
    out, preds = tmp_path / "run", tmp_path / "preds"
    cfg = load_config(FinetuneConfig, configs_dir() / "finetune" / "shapes-depth-dpt-tiny.yaml",
                      [f"data.root={root}", f"out_dir={out}", f"save_predictions={preds}", "data.batch_size=4",
                       "data.crop_size=[32,32]", "train.schedule.total_steps=16", "train.schedule.warmup_steps=4",
                       "train.log_every=1", "train.checkpoint.keep=1", "train.optim.lr=3e-3"])
    assert cfg.head.kind == "dpt" and cfg.backbone.lr_scale == 0.1 and cfg.data.rotate_degrees == 2.5

    from clipdense.dense.task import DenseTask
    from clipdense.train import TrainContext

    task = DenseTask(cfg)
    task.setup(TrainContext())
    model = task.build_model()
    groups = task.param_groups(model, cfg.train.optim)
    scale = {n: g["lr_scale"] for g in groups for n in g["param_names"]}
    assert scale["backbone.vit.transformer.resblocks.0.mlp.c_fc.weight"] == pytest.approx(0.1)
    assert scale["backbone.vit.positional_embedding"] == pytest.approx(0.1)
    assert scale["backbone.neck.readout.0.0.weight"] == 1.0 and scale["decode_head.project.0.weight"] == 1.0
    assert sum(len(g["params"]) for g in groups) == len([p for p in model.parameters() if p.requires_grad])

    run(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 16 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    record = json.loads((out / "metrics.json").read_text())
    assert record["head"] == "dpt" and record["config"]["head"]["kind"] == "dpt"
    assert record["backbone"]["params"] < record["backbone"]["model_params"]
    m = record["metrics"]
    again = rescore_depth(preds, root, "nyudepthv2_test_files_with_gt.txt")
    assert again["rmse"] == pytest.approx(m["rmse"], abs=1e-3)


def test_shipped_nyu_recipe_is_the_toolbox_dpt():
    cfg = load_config(FinetuneConfig, configs_dir() / "finetune" / "nyuv2-depth.yaml")
    assert (cfg.head.kind, cfg.head.channels, cfg.head.depth_loss_weight) == ("dpt", 256, 1.0)
    assert cfg.backbone.lr_scale == 0.1 and cfg.train.optim.layer_decay is None
    assert (cfg.data.nyu_crop, cfg.data.rotate_degrees, cfg.data.color_aug) == (True, 2.5, True)
    s = cfg.train.schedule
    assert s.kind == "cosine" and s.warmup_steps == pytest.approx(0.3 * s.total_steps)
    upernet = load_config(FinetuneConfig, configs_dir() / "finetune" / "nyuv2-depth.yaml",
                          ["head.kind=upernet", "head.channels=512"])
    assert upernet.head.kind == "upernet"  # still an option
