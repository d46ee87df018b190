"""The training runner on Ray Train V2 (2 CPU workers, gloo): a killed worker recovers from the checkpoint exactly."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import torch
import train_toy
from ray_train_state import registered_checkpoint_step
from train_toy import KillableToy, Toy

from clipdense.config import build_config
from clipdense.train import TrainConfig, fit
from clipdense.train.state import load_checkpoint


@pytest.fixture(scope="module", autouse=True)
def _ship_toy_module():
    # Ray workers cannot import tests/ modules: send the toy tasks by value.
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(train_toy)
    yield
    cloudpickle.unregister_pickle_by_value(train_toy)


def _cfg(out, **kw) -> TrainConfig:
    data = {"out_dir": str(out), "schedule": {"total_steps": 12, "warmup_steps": 2}, "log_every": 4,
            "checkpoint": {"every_steps": 4, "keep": 2}, "optim": {"lr": 1e-2},
            "scaling": {"num_workers": 2, "cpus_per_worker": 0.5}}
    data.update(kw)
    return build_config(TrainConfig, data)


@pytest.mark.slow
def test_killed_worker_recovers_from_checkpoint_to_the_uninterrupted_weights(ray_local, tmp_path):
    """Rank 1 is SIGKILLed at step 6; Ray Train restarts the group from the step-4 checkpoint and the run ends with
    exactly the weights and state of an uninterrupted run (RNG, schedule and task state restored). Resuming by
    rerunning a stopped run is tested on pretraining (test_pretrain_train.py), through the same runner."""
    full = fit(Toy, _cfg(tmp_path / "full", log_every=6))
    assert full["step"] == 12 and full["checkpoint"]
    out = tmp_path / "run"
    cfg = _cfg(out, max_failures=1, log_every=6)

    def killer():
        pid_file = out / "victim.pid"
        deadline = time.time() + 240
        while not pid_file.exists() and time.time() < deadline:
            time.sleep(0.1)
        while registered_checkpoint_step(out) < 4 and time.time() < deadline:  # lost with the worker otherwise
            time.sleep(0.1)
        os.kill(int(pid_file.read_text()), signal.SIGKILL)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    result = fit(KillableToy, cfg)
    thread.join(5)
    assert result["step"] == 12 and result["stopped_early"] is False
    assert result["restored_from_steps"] == [4]
    a, sa = load_checkpoint(full["checkpoint"])
    b, state = load_checkpoint(result["checkpoint"])
    assert state["step"] == 12 and state["world_size"] == 2 and len(state["rng"]) == 2
    assert all(torch.equal(a[k], b[k]) for k in a), "the recovered run's weights differ from the uninterrupted run's"
    events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "resume"] == [4]
    logs = [e for e in events if "loss" in e]
    assert [e["step"] for e in logs] == [6, 6, 12]  # step 6 before the kill, then replayed from step 4
    assert logs[0]["lr"] == logs[1]["lr"]  # the schedule resumed at the same step
