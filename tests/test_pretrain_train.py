"""Pretraining end to end on a learnable toy: caption policies, CoCa, Ray Train with 2 workers, export, resume."""
from __future__ import annotations

import contextlib
import io
import json
import math

import open_clip
import pytest
import torch
from pretrain_files import write_world

from clipdense.cli import main as cli_main
from clipdense.config import build_config
from clipdense.models import create_clip
from clipdense.pretrain import PretrainConfig, run
from clipdense.train.state import load_checkpoint


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_world(tmp_path_factory.mktemp("world"), n_shards=2, per_shard=40, bad=True)


def _cfg(world, out, policy="both", model="clip-tiny", in_process=True, **train) -> PretrainConfig:
    t = {"out_dir": str(out), "optim": {"lr": 2e-3}, "schedule": {"total_steps": 12, "warmup_steps": 2},
         "log_every": 4, "checkpoint": {"every_steps": 4}, "scaling": {"num_workers": 2, "cpus_per_worker": 0.5}}
    t.update(train)
    return build_config(PretrainConfig, {
        "model": {"name": model}, "captions": {"policy": policy}, "ray": {"in_process": in_process},
        "data": {"shards": world["shards"], "recaptions": world["recaptions"], "batch_size": 16,
                 "decode_cpus": 0.5},
        "eval": {"holdout": 8}, "train": t})


def _losses(out) -> list[float]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r]


@pytest.fixture(scope="module")
def ray_run(ray_local, world, tmp_path_factory):
    """policy `both` (DataCompDR) on 2 Ray Train workers reading a split Ray dataset; also what the driver printed
    (the local Ray runs with log_to_driver=False: a worker's prints would not reach this process)."""
    out = tmp_path_factory.mktemp("ray_both")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = run(_cfg(world, out, "both", in_process=False))
    return out, result, world, printed.getvalue()


def test_ray_two_workers_both_policy(ray_run):
    out, result, world, _ = ray_run
    assert result["step"] == 12 and not result["stopped_early"]
    assert result["data"]["errors"] == {"recaption_failed": 1, "no_recaption_for_key": 1, "undecodable_image": 1}
    assert result["data"]["ok"] == world["rows"] - 3 and result["data"]["holdout_rows"] == 8
    losses = _losses(out)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    m = result["metrics"]
    assert {"loss_real", "loss_syn", "logit_scale", "samples_per_s", "data_wait_frac"} <= set(m)
    assert m["eval/rows"] == 8 and 0.0 <= m["eval/i2t_R@1"] <= m["eval/i2t_R@5"] <= 1.0


def test_ray_run_shows_progress_on_the_driver(ray_run):
    printed = ray_run[3].splitlines()
    steps = [ln for ln in printed if ln.startswith("[clipdense] step") and " loss " in ln]
    assert [ln.split()[2] for ln in steps] == ["4/12", "8/12", "12/12"]
    for key in ("loss ", "lr ", "samples/s", "data wait", "ETA "):
        assert all(key in ln for ln in steps)
    assert any(ln.startswith("[clipdense] step 12/12  eval ") and "i2t_R@1" in ln for ln in printed)  # final eval


def test_export_loads_in_open_clip(ray_run):
    out, result, _, _ = ray_run
    info = json.loads((out / "export" / "export.json").read_text())
    assert info["name"] == "clip-tiny" and info["steps"] == 12 and info["params"] > info["visual_params"] > 0
    exported = torch.load(info["model"], map_location="cpu", weights_only=True)
    create_clip("clip-tiny")  # registers clipdense's tiny configs with open_clip
    loaded = open_clip.create_model("clip-tiny", pretrained=info["model"])
    assert all(torch.equal(v, exported[k]) for k, v in loaded.state_dict().items())
    fresh = create_clip("clip-tiny")
    fresh.visual.load_state_dict(torch.load(info["visual"], map_location="cpu", weights_only=True))
    assert torch.equal(fresh.visual.conv1.weight, loaded.visual.conv1.weight)
    final, _ = load_checkpoint(result["checkpoint"])  # Ray's last checkpoint holds the same weights
    assert all(torch.equal(final[k], exported[k]) for k in exported)


@pytest.mark.slow
def test_ray_resume_and_cached_training_set_give_identical_weights(ray_run, tmp_path):
    """A run stopped at step 7 and rerun resumes from the step-4 checkpoint; both runs use `data.cache` (decoded once,
    the object-store copy replayed each epoch). The result has exactly the weights of the uncached, uninterrupted
    run: the cache gives the same rows and crops, and the resume restores data position, RNG and optimizer."""
    out, result, world, _ = ray_run
    cfg = _cfg(world, tmp_path, "both", in_process=False)
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"cache": True})})
    stop = cfg.train.model_copy(update={"stop_at_step": 7})
    cut = run(cfg.model_copy(update={"train": stop}))
    assert cut["stopped_early"] and cut["step"] == 7
    resumed = run(cfg)
    assert resumed["restored_from_steps"] == [4] and resumed["step"] == 12
    assert resumed["data"]["ok"] == result["data"]["ok"]
    a = torch.load(out / "export" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "export" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("policy", ["real", "synthetic", "mix"])
def test_policies_train_in_process(ray_local, world, tmp_path, policy):
    result = run(_cfg(world, tmp_path, policy, checkpoint={"every_steps": 0}))
    losses = _losses(tmp_path)
    assert result["step"] == 12 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_pretrain_shows_progress_and_writes_tensorboard(ray_local, world, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg(world, tmp_path, "real", checkpoint={"every_steps": 0})
    cfg = cfg.model_copy(update={"tracking": build_config(type(cfg.tracking), {"progress": "lines",
                                                                               "tensorboard": True})})
    run(cfg)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[clipdense] step")]
    assert [ln.split()[2] for ln in lines][:3] == ["4/12", "8/12", "12/12"]
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert [e.step for e in acc.Scalars("loss")] == [4, 8, 12] and {"lr", "logit_scale"} <= set(tags)
    assert [e.step for e in acc.Scalars("eval/i2t_R@1")] == [12]  # the final evaluation


def test_coca_trains_with_caption_loss(ray_local, world, tmp_path):
    result = run(_cfg(world, tmp_path, "synthetic", model="coca-tiny", checkpoint={"every_steps": 0}, log_every=3,
                      schedule={"total_steps": 6, "warmup_steps": 1}))
    losses = _losses(tmp_path)
    assert losses[-1] < losses[0] and "caption_loss_0" in result["metrics"]
    assert json.loads((tmp_path / "export" / "export.json").read_text())["name"] == "coca-tiny"


def test_cli_bad_input_is_one_line_error(ray_local, tmp_path, capsys):
    rc = cli_main(["pretrain", "--config", "configs/pretrain/clip-tiny-shapes.yaml", f"train.out_dir={tmp_path}",
                   f"data.shards={tmp_path}/missing/*.tar", "ray.in_process=true"])
    err = capsys.readouterr().err
    assert rc == 2 and "no input files match" in err and len(err.strip().splitlines()) == 1
