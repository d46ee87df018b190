"""The training runner without Ray (`fit_local`): schedule, param groups, metrics, checkpoints, exact resume."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from train_toy import Toy

from clipdense.config import ConfigError, DataError, build_config
from clipdense.train import ScheduleConfig, TrainConfig, default_param_groups, fit_local
from clipdense.train.schedule import lr_factor
from clipdense.train.state import load_checkpoint


def _cfg(out, **kw) -> TrainConfig:
    data = {"out_dir": str(out), "schedule": {"total_steps": 20, "warmup_steps": 2}, "log_every": 5,
            "checkpoint": {"every_steps": 4, "keep": 2}, "optim": {"lr": 1e-2}}
    data.update(kw)
    return build_config(TrainConfig, data)


def test_lr_schedule_shapes():
    cos = ScheduleConfig(kind="cosine", warmup_steps=10, total_steps=110)
    assert lr_factor(0, cos) == pytest.approx(0.1)
    assert lr_factor(9, cos) == pytest.approx(1.0)
    assert lr_factor(60, cos) == pytest.approx(0.5)
    assert lr_factor(110, cos) == pytest.approx(0.0, abs=1e-12)
    poly = ScheduleConfig(kind="poly", warmup_steps=0, total_steps=100, power=1.0, min_lr_ratio=0.1)
    assert lr_factor(50, poly) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(7, ScheduleConfig(kind="constant", warmup_steps=2, total_steps=9)) == 1.0


def test_default_param_groups_exclude_1d_and_logit_scale():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    model.logit_scale = nn.Parameter(torch.ones([]))
    groups = default_param_groups(model, weight_decay=0.2)
    decay = [g for g in groups if g["weight_decay"] > 0]
    assert len(decay) == 1 and [p.shape for p in decay[0]["params"]] == [torch.Size([4, 3])]
    no_decay = [g for g in groups if g["weight_decay"] == 0][0]["params"]
    assert any(p is model.logit_scale for p in no_decay) and len(no_decay) == 4


def test_config_errors_are_one_line():
    with pytest.raises(ConfigError, match="scaling.min_workers|min_workers"):
        build_config(TrainConfig, {"scaling": {"num_workers": 1, "min_workers": 2}})
    with pytest.raises(ConfigError, match="unknown key 'optim.lrr'"):
        build_config(TrainConfig, {"optim": {"lrr": 1}})


def test_fit_local_learns_and_logs(tmp_path):
    result = fit_local(Toy, _cfg(tmp_path))
    assert result["step"] == 20 and result["stopped_early"] is False
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logs = [r for r in lines if "loss" in r]
    assert [r["step"] for r in logs] == [5, 10, 15, 20]
    assert logs[-1]["loss"] < logs[0]["loss"] and all(math.isfinite(r["loss"]) for r in logs)
    for key in ("lr", "samples_per_s", "samples_per_s_per_worker", "data_wait_frac", "seen"):
        assert key in logs[0]
    assert 0.0 <= logs[0]["data_wait_frac"] <= 1.0
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["step_00000016", "step_00000020"]  # keep=2
    model_sd, state = load_checkpoint(tmp_path / "checkpoints" / "step_00000020")
    assert state["step"] == 20 and state["task"] == {"seen": 20} and "0.weight" in model_sd
    # both files hold tensors and plain values only: loading never needs to run pickled code
    raw = torch.load(tmp_path / "checkpoints" / "step_00000020" / "train_state.pt", weights_only=True)
    assert raw["step"] == 20 and raw["rng"][0]["numpy"][0] == "MT19937"
    assert json.loads((tmp_path / "result.json").read_text())["step"] == 20


def test_fit_local_exact_resume_mid_epoch(tmp_path):
    full = fit_local(Toy, _cfg(tmp_path / "full"))
    # Killed at step 7 (mid-epoch 1 of 5-batch epochs); the last checkpoint is step 4 (epoch 0, batch 4).
    stopped = fit_local(Toy, _cfg(tmp_path / "cut", stop_at_step=7))
    assert stopped["stopped_early"] and stopped["step"] == 7
    resumed = fit_local(Toy, _cfg(tmp_path / "cut"))
    assert resumed["restored_from_steps"] == [4] and resumed["step"] == 20
    a, sa = load_checkpoint(full["checkpoint"])
    b, sb = load_checkpoint(resumed["checkpoint"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sa["task"] == sb["task"] == {"seen": 20}
    for ga, gb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert torch.equal(ga["exp_avg"], gb["exp_avg"])


def test_empty_epoch_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no training batches"):
        fit_local(lambda: Toy(n_batches=0), _cfg(tmp_path))


def test_fused_adamw_is_the_default_and_takes_the_same_steps(tmp_path):
    """train.optim.fused (default): torch's fused AdamW kernel; `false`: torch's default implementation. The same
    update up to float rounding, so the two runs' weights agree closely (and both moved from the start)."""
    runs = {}
    for fused in (True, False):
        fit_local(Toy, _cfg(tmp_path / str(fused), optim={"lr": 1e-2, "fused": fused}))
        raw = torch.load(tmp_path / str(fused) / "checkpoints" / "step_00000020" / "train_state.pt", weights_only=True)
        assert bool(raw["optimizer"]["param_groups"][0]["fused"]) is fused  # which kernel ran is in the state
        runs[fused] = load_checkpoint(tmp_path / str(fused) / "checkpoints" / "step_00000020")[0]
    start = Toy().build_model().state_dict()
    for name, w in runs[True].items():
        assert torch.allclose(w, runs[False][name], rtol=1e-4, atol=1e-5), name
        assert not torch.allclose(w, start[name]), name
