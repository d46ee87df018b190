"""The fitted probe (sweep protocol fit): the ridge solver, the penalty chosen without eval data, the sweep's trial
directories read by the report, cached features, the position-only baseline and seg mIoU on atypical pixels."""
import json
import shutil

import numpy as np
import pytest
import torch
from dense_files import write_ade, write_nyu
from PIL import Image

from clipdense.config import ConfigError, build_config
from clipdense.dense.config import FinetuneConfig
from clipdense.dense.fit_probe import FitProbe, FitProbeConfig
from clipdense.dense.fit_probe.ridge import fit_ridge
from clipdense.dense.fit_probe.targets import SegTargets
from clipdense.sweep import SweepConfig, run

SEG_CONFIG = "configs/finetune/shapes-seg-tiny.yaml"
DEPTH_CONFIG = "configs/finetune/shapes-depth-tiny.yaml"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    write_ade(root / "ade", n_train=12, n_val=4, size=(64, 64))
    write_nyu(root / "nyu", n_train=12, n_test=4, size=(64, 64))
    return root


def test_ridge_recovers_a_linear_map():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(600, 12, generator=gen) * torch.linspace(0.5, 3.0, 12)
    w, b = torch.randn(12, 3, generator=gen), torch.tensor([1.0, -2.0, 0.5])
    y = x @ w + b + 0.01 * torch.randn(600, 3, generator=gen)
    x_new = torch.randn(50, 12, generator=gen)
    for groups in (torch.arange(600) // 60, torch.zeros(600, dtype=torch.long)):   # k-fold over 10 images; GCV
        fit = fit_ridge(x, y, groups, [1e-8, 1e-4, 1.0, 100.0], folds=5)
        assert fit.choice["method"] == ("kfold" if groups.max() > 0 else "gcv")
        assert fit.alpha <= 1e-4                                 # near noise-free data: a small penalty wins
        assert torch.allclose(fit.predict(x_new).float(), x_new @ w + b, atol=0.02)
    pure_noise = torch.randn(600, 1, generator=gen)              # nothing to learn: the largest penalty wins
    assert fit_ridge(x, pure_noise, torch.arange(600) // 60, [1e-8, 1e-4, 1.0, 100.0]).alpha == 100.0


def _seg_cfg(root, out, num_classes: int = 3) -> FinetuneConfig:
    data = {"task": "seg", "backbone": {"name": "position-only"}, "out_dir": str(out),
            "data": {"root": str(root), "num_classes": num_classes, "crop_size": [64, 64]}}
    return build_config(FinetuneConfig, data)


def test_penalty_choice_never_reads_eval_labels(world, tmp_path):
    other = tmp_path / "ade"
    shutil.copytree(world / "ade", other)
    for ann in (other / "ADEChallengeData2016" / "annotations" / "validation").glob("*.png"):
        label = np.asarray(Image.open(ann))
        Image.fromarray(((label + 1) % 4).astype(np.uint8)).save(ann)   # every eval label changed
    fit = FitProbeConfig()
    runs = [FitProbe(_seg_cfg(root, tmp_path), fit, tmp_path / f"{i}.pt").run(0.5, 1)
            for i, root in enumerate((world / "ade", other))]
    assert runs[0]["probe"]["alpha"] == runs[1]["probe"]["alpha"]
    assert runs[0]["probe"]["regulariser"]["scores"] == runs[1]["probe"]["regulariser"]["scores"]
    assert runs[0]["metrics"]["mIoU"] != runs[1]["metrics"]["mIoU"]     # the eval labels did change the score


def test_iou_on_atypical_pixels_is_the_iou_inside_the_mask():
    label = torch.tensor([[0, 0, 1, 1]] * 4, dtype=torch.uint8)
    scores = torch.zeros(1, 2, 4, 4)
    scores[0, 0, :, :3] = 1.0                                  # predicts class 0 in columns 0-2, class 1 in 3
    scores[0, 1, :, 3] = 1.0
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[:, 1:3] = True                                        # atypical: columns 1 (gt 0) and 2 (gt 1)
    cfg = _seg_cfg("unused", "unused", num_classes=2)
    out = SegTargets().score(scores, [label], cfg, [mask])
    # inside the mask: class 0 gt 4 px, predicted 8 px, 4 right -> 4/8; class 1 gt 4 px, none predicted -> 0
    assert out["mIoU_atypical"] == pytest.approx((0.5 + 0.0) / 2)
    assert out["atypical_pixels"] == 8
    assert "mIoU_atypical" not in SegTargets().score(scores, [label], cfg, None)


def _sweep(world, out, fractions, **extra) -> dict:
    return {"name": "fit", "out": str(out), "protocol": "fit", "verbose": 0, "fractions": fractions, "seeds": 2,
            "small_fraction_seeds": None, "fit": {"in_process": True},
            "report": {"reference": "random-init", "bootstrap": 20},
            "backbones": [{"name": "random-init", "backbone": {"name": "clip-tiny", "checkpoint": None}},
                          {"name": "position", "backbone": {"name": "position-only"}}],
            "tasks": [{"name": "seg", "config": SEG_CONFIG,
                       "overrides": {"data.root": str(world / "ade"), "data.num_classes": 3}},
                      {"name": "depth", "config": DEPTH_CONFIG, "overrides": {"data.root": str(world / "nyu")}}],
            **extra}


def _atypical_masks(ade):
    folder = ade / "atypical" / "validation"
    folder.mkdir(parents=True)
    for ann in (ade / "ADEChallengeData2016" / "annotations" / "validation").glob("*.png"):
        label = np.asarray(Image.open(ann))
        Image.fromarray((label > 0).astype(np.uint8)).save(folder / ann.name)   # every object pixel is atypical


def test_fit_sweep_writes_trials_the_report_reads_and_reuses_features(world, tmp_path):
    shutil.copytree(world, tmp_path / "w")
    _atypical_masks(tmp_path / "w" / "ade")
    out = tmp_path / "sweep"
    summary = run(build_config(SweepConfig, _sweep(tmp_path / "w", out, [0.25, 1.0])))
    assert summary["failed"] == [] and summary["jobs"] == 4 and summary["trials"] == 2 * 2 * 2 * 2
    assert summary["in_process"] is True
    assert summary["provenance"]["code_version"]["commit"]
    trials = out / "trials"
    for task, key in (("seg", "mIoU"), ("depth", "rmse")):
        for bb in ("random-init", "position"):
            docs = [json.loads((trials / task / bb / f / s / "metrics.json").read_text())
                    for f in ("f0.25", "f1") for s in ("s0", "s1")]
            assert all(d["protocol"] == "fit" and np.isfinite(d["metrics"][key]) for d in docs)
            assert docs[2]["metrics"] == docs[3]["metrics"]          # fraction 1: one subset, every seed
            assert docs[0]["data"]["train_samples"] == 3 and docs[2]["data"]["train_samples"] == 12
            assert docs[0]["metrics"]["images"] == 4                  # every eval image
            probe = docs[0]["probe"]
            assert probe["resolution"] == ([64, 64] if task == "seg" else [96, 96]) and probe["alpha"] > 0
            assert docs[0]["provenance"]["config_hash"] and docs[0]["provenance"]["code_version"]["commit"]
            assert ("mIoU_atypical" in docs[0]["metrics"]) == (task == "seg")
    seg_rand = json.loads((trials / "seg/random-init/f1/s0/metrics.json").read_text())
    assert seg_rand["probe"]["layers"] == [1] and seg_rand["probe"]["grid"] == [8, 8]    # clip-tiny: 2 blocks
    assert seg_rand["backbone"]["params"] > 0
    factors = json.loads((out / "factors.json").read_text())
    assert set(factors) == {"seg", "depth"} and "position" in factors["depth"]["backbones"]

    cache = out / "features" / "seg" / "random-init.pt"
    mtime = cache.stat().st_mtime_ns
    done = (trials / "seg/random-init/f1/s0/metrics.json").stat().st_mtime_ns
    again = run(build_config(SweepConfig, _sweep(tmp_path / "w", out, [0.25, 0.5, 1.0], run_report=False)))
    assert again["skipped"] == 16 and again["trials"] == 24 and again["failed"] == []
    assert cache.stat().st_mtime_ns == mtime                          # features read back, not computed again
    assert json.loads((trials / "seg/random-init/f0.5/s0/metrics.json").read_text())["probe"]["features_reused"]
    assert (trials / "seg/random-init/f1/s0/metrics.json").stat().st_mtime_ns == done

    changed = run(build_config(SweepConfig, _sweep(tmp_path / "w", out, [1.0], run_report=False,
                                                   fit={"in_process": True, "alphas": [1e-3]})))
    assert changed["skipped"] == 0 and changed["trials"] == 8        # another fit config: fitted again
    redone = json.loads((trials / "seg/random-init/f1/s0/metrics.json").read_text())
    assert redone["probe"]["alpha"] == 1e-3 and redone["probe"]["regulariser"]["method"] == "fixed"
    assert cache.stat().st_mtime_ns == mtime                          # the features did not change


def test_position_only_is_refused_by_protocol_finetune(world, tmp_path):
    data = _sweep(world, tmp_path, [1.0], protocol="finetune")
    with pytest.raises(ConfigError) as e:
        build_config(SweepConfig, data)
    assert "position-only" in str(e.value) and "\n" not in str(e.value)


def test_fit_jobs_run_as_ray_tasks(ray_local, world, tmp_path):
    data = _sweep(world, tmp_path / "sweep", [0.5, 1.0], fit={"in_process": False}, run_report=False, report={},
                  backbones=[{"name": "position", "backbone": {"name": "position-only"}}])
    data["tasks"] = data["tasks"][1:]                                 # one job (depth), in a Ray task all the same
    summary = run(build_config(SweepConfig, data))
    assert summary["jobs"] == 1 and summary["failed"] == [] and summary["in_process"] is False
    docs = [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep" / "trials").rglob("metrics.json"))]
    assert len(docs) == 2 * 2 and all(d["protocol"] == "fit" and d["metrics"]["rmse"] > 0 for d in docs)
