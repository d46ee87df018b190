"""Each dense task trains a few steps on tiny files through the one runner: the loss goes down, metrics.json holds
metrics + config + backbone provenance, and saved predictions re-score to the same metric."""
from __future__ import annotations

import json
import math

import pytest
from dense_files import write_ade, write_coco, write_nyu

from clipdense.cli import main as cli_main
from clipdense.config import load_config
from clipdense.dense import FinetuneConfig, run
from clipdense.dense.evaluate import rescore_depth, rescore_det, rescore_seg

TINY = ["data.batch_size=4", "train.optim.lr=2e-3", "train.schedule.warmup_steps=2", "train.log_every=1",
        "train.checkpoint.keep=1"]
# each task's config has only its own keys (a key of another task is an error)
DECODER = ["data.crop_size=[32,32]", "data.photometric=false", "head.channels=32", "head.dropout=0.0"]
TINY_TASK = {"seg": DECODER + ["head.aux_channels=16"], "depth": DECODER, "det": []}
STEPS = {"seg": 16, "depth": 16, "det": 12}


def _cfg(task: str, root, out, *extra: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, None, [f"task={task}", f"data.root={root}", f"out_dir={out}",
                                              f"train.schedule.total_steps={STEPS[task]}", *TINY, *TINY_TASK[task],
                                              *extra])


def _losses(out) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _check_common(out, losses, task: str) -> dict:
    assert len(losses) == STEPS[task]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    record = json.loads((out / "metrics.json").read_text())
    assert record["task"] == task
    assert record["backbone"]["name"] == "clip-tiny" and record["backbone"]["checkpoint"] is None
    assert record["backbone"]["params"] > 0 and record["backbone"]["model_params"] > record["backbone"]["params"]
    assert record["config"]["task"] == task and record["config"]["data"]["batch_size"] == 4
    assert record["train"]["steps"] == STEPS[task]
    scales = [g["lr_scale"] for g in record["lr_scales"]]  # one row per optimizer group
    assert record["layer_decay"]["family"] == "vit" and max(scales) == 1.0
    assert min(scales) >= record["config"]["train"]["optim"]["min_lr_scale"]
    assert sum(g["numel"] for g in record["lr_scales"]) <= record["backbone"]["model_params"]
    return record


def test_seg_trains_writes_metrics_and_predictions(tmp_path):
    root = tmp_path / "ade"
    write_ade(root, n_train=8, n_val=2, size=(48, 64), num_classes=3)
    out, preds = tmp_path / "run", tmp_path / "preds"
    cfg = _cfg("seg", root, out, "data.num_classes=3", "data.scale=[96,48]", "data.ratio_range=[0.5,1.0]",
               "eval.crop_size=[32,32]", "eval.stride=[21,21]", "eval.test_scale=null", f"save_predictions={preds}")
    result = run(cfg)
    record = _check_common(out, _losses(out), "seg")
    m = record["metrics"]
    assert 0 <= m["mIoU"] <= 1 and len(m["IoU_per_class"]) == 3 and m["images"] == 2
    assert result["metrics"]["eval/mIoU"] == pytest.approx(m["mIoU"])
    assert sorted(p.name for p in preds.iterdir()) == ["ADE_val_00000001.png", "ADE_val_00000002.png"]
    again = rescore_seg(preds, root, "validation", num_classes=3, reduce_zero=True)
    assert again["mIoU"] == pytest.approx(m["mIoU"]) and again["aAcc"] == pytest.approx(m["aAcc"])


@pytest.mark.parametrize("head", [[], ["head.kind=linear", "head.depth_bins=16", "backbone.frozen=true"]],
                         ids=["upernet-regression", "linear-bins-probe"])
def test_depth_trains_and_saved_pngs_rescore(tmp_path, head):
    root = tmp_path / "nyu"
    write_nyu(root, n_train=8, n_test=2, size=(48, 64))
    out, preds = tmp_path / "run", tmp_path / "preds"
    run(_cfg("depth", root, out, f"save_predictions={preds}", *head))
    record = _check_common(out, _losses(out), "depth")
    m = record["metrics"]
    assert m["images"] == 2 and 0 < m["abs_rel"] and 0 <= m["delta1"] <= 1
    again = rescore_depth(preds, root, "nyudepthv2_test_files_with_gt.txt")
    assert again["rmse"] == pytest.approx(m["rmse"], abs=1e-3)  # PNGs hold whole millimetres
    assert again["abs_rel"] == pytest.approx(m["abs_rel"], abs=1e-3)


def test_det_trains_and_results_json_rescores(tmp_path):
    root = tmp_path / "coco"
    write_coco(root, n_train=8, n_val=3, size=(64, 64))
    out, preds = tmp_path / "run", tmp_path / "preds"
    cfg = _cfg("det", root, out, "head.fpn_channels=16", "head.anchor_sizes=[8,16,32,64,128]", "head.min_size=64",
               "head.max_size=64", "head.representation_size=64", "head.box_batch_size_per_image=32",
               f"save_predictions={preds}")
    run(cfg)
    record = _check_common(out, _losses(out), "det")
    m = record["metrics"]
    assert m["images"] == 3 and -1 <= m["map"] <= 1
    rows = json.loads((preds / "detections.json").read_text())
    assert all(r["category_id"] in (1, 3, 7) and len(r["bbox"]) == 4 for r in rows)
    again = rescore_det(preds / "detections.json", root / "annotations" / "instances_val2017.json")
    assert again["map"] == pytest.approx(max(m["map"], 0.0), abs=1e-6)


def test_fraction_limits_training_set(tmp_path):
    root = tmp_path / "ade"
    write_ade(root, n_train=8, n_val=1, size=(32, 32), num_classes=3)
    out = tmp_path / "run"
    run(_cfg("seg", root, out, "data.num_classes=3", "data.fraction=0.25", "data.seed=5", "data.scale=[64,32]",
             "train.schedule.total_steps=2", "eval.mode=whole", "eval.test_scale=null"))
    record = json.loads((out / "metrics.json").read_text())
    assert record["data"]["train_samples"] == math.ceil(8 * 0.25) and record["data"]["fraction"] == 0.25


def test_cli_bad_annotation_is_one_line_naming_the_file(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    root = tmp_path / "ade"
    base = write_ade(root, n_train=2, n_val=1, size=(32, 32), num_classes=3)
    bad = base / "annotations" / "validation" / "ADE_val_00000001.png"
    Image.fromarray(np.full((32, 32), 40, np.uint8)).save(bad)
    code = cli_main(["finetune", "--out", str(tmp_path / "r"), "task=seg", f"data.root={root}", "data.num_classes=3",
                     "train.schedule.total_steps=1", "data.batch_size=2", "head.channels=8", "head.aux_channels=8",
                     "eval.mode=whole", "eval.test_scale=null", "data.crop_size=[32,32]"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and str(bad) in err and "label 40" in err


def test_interrupted_run_resumes_to_the_same_result(tmp_path):
    """Stop after 3 of 6 steps, rerun in the same out_dir: the resumed run ends where an uninterrupted one does."""
    root = tmp_path / "ade"
    write_ade(root, n_train=6, n_val=1, size=(32, 32), num_classes=3)
    common = ["data.num_classes=3", "data.scale=[64,32]", "eval.mode=whole", "eval.test_scale=null",
              "train.schedule.total_steps=6", "train.deterministic=true", "train.checkpoint.every_steps=3"]
    whole = run(_cfg("seg", root, tmp_path / "whole", *common))
    stopped = run(_cfg("seg", root, tmp_path / "split", *common, "train.stop_at_step=3"))
    assert stopped["stopped_early"] and stopped["metrics_json"] is None
    resumed = run(_cfg("seg", root, tmp_path / "split", *common))
    record = json.loads((tmp_path / "split" / "metrics.json").read_text())
    assert record["train"]["restored_from_steps"] == [3]
    assert resumed["metrics"]["loss"] == pytest.approx(whole["metrics"]["loss"], rel=1e-5)
    assert resumed["metrics"]["eval/mIoU"] == pytest.approx(whole["metrics"]["eval/mIoU"], rel=1e-5)


def test_shipped_configs_load():
    from clipdense.config import configs_dir

    names = sorted(p.name for p in (configs_dir() / "finetune").glob("*.yaml"))
    assert {"ade20k-upernet-vitb16.yaml", "nyuv2-depth.yaml", "coco-det.yaml", "shapes-seg-tiny.yaml",
            "shapes-depth-tiny.yaml", "shapes-det-tiny.yaml"} <= set(names)
    ade = load_config(FinetuneConfig, configs_dir() / "finetune" / "ade20k-upernet-vitb16.yaml")
    o, s = ade.train.optim, ade.train.schedule
    assert (o.lr, o.weight_decay, o.layer_decay, s.kind, s.warmup_steps, s.total_steps) == \
        (1e-4, 0.05, "auto", "poly", 1500, 160_000)  # auto: 0.65 for this ViT (clipdense.dense.optim)
    assert ade.backbone.drop_path == 0.1 and ade.data.crop_size == [512, 512] and ade.data.batch_size == 16
    for name in names:
        cfg = load_config(FinetuneConfig, configs_dir() / "finetune" / name)
        if name.startswith("shapes-"):
            assert cfg.backbone.name == "clip-tiny" and cfg.train.schedule.total_steps <= 100


def test_frozen_trunk_linear_probe_trains_only_neck_and_head(tmp_path):
    """The probe protocol: `backbone.frozen` keeps the pretrained trunk bit-identical (and in eval mode) while the
    neck and the linear head learn; the loss still falls."""
    import torch

    from clipdense.dense.task import DenseTask
    from clipdense.models import create_clip
    from clipdense.train import TrainContext

    root, ckpt = tmp_path / "ade", tmp_path / "pretrained.pt"
    write_ade(root, n_train=8, n_val=2, size=(48, 64), num_classes=3)
    pretrained = create_clip("clip-tiny").state_dict()
    torch.save(pretrained, ckpt)
    cfg = _cfg("seg", root, tmp_path / "run", "data.num_classes=3", "data.scale=[96,48]", "eval.crop_size=[32,32]",
               "eval.stride=[21,21]", "eval.test_scale=null", "backbone.frozen=true", "head.kind=linear",
               f"backbone.checkpoint={ckpt}")
    task = DenseTask(cfg)
    task.setup(TrainContext())
    model = task.build_model()
    trunk = task.backbone.vit.state_dict()
    assert trunk and all(torch.equal(v, pretrained[f"visual.{k}"]) for k, v in trunk.items())
    neck = {k: v.clone() for k, v in task.backbone.neck.state_dict().items()}
    model.train()
    assert not task.backbone.vit.training and task.backbone.neck.training
    groups = task.param_groups(model, cfg.train.optim)
    trained = {n for g in groups for n in g["param_names"]}
    assert trained and not any(n.startswith("backbone.vit.") for n in trained)
    assert any(n.startswith("decode_head.classifier") for n in trained) and model.aux_head is None

    out = tmp_path / "run"
    run(cfg)
    losses = _losses(out)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    record = json.loads((out / "metrics.json").read_text())
    assert record["backbone"]["frozen"] is True and record["config"]["head"]["kind"] == "linear"
    state = torch.load(next(out.rglob("model.pt")), map_location="cpu")  # the final checkpoint (keep=1)
    for k in trunk:
        assert torch.equal(state[f"backbone.vit.{k}"], pretrained[f"visual.{k}"]), k
    assert any(not torch.equal(state[f"backbone.neck.{k}"], v) for k, v in neck.items() if v.is_floating_point())


def test_linear_head_on_detection_is_a_one_line_config_error(tmp_path, capsys):
    code = cli_main(["finetune", "task=det", "head.kind=linear", f"out_dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "head.kind 'linear'" in err[0] and "det" in err[0]
