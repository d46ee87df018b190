"""A crash inside Ray while a failed Train run is torn down (Ray 2.60's `subscriber.cc:335 Check failed:
!reply.publisher_id().empty()` once aborted the pytest driver) takes the child process that drives the run, never the
caller: the run's driver lives in `clipdense.train.isolate`'s driver host."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import torch
from torch import nn

from clipdense.config import DataError, build_config
from clipdense.train import TrainConfig, TrainTask, fit, isolate
from clipdense.train.isolate import DriverHostDied, run_in_driver_host

PLANTED = "shard test-00000.tar row 3: no caption (a planted user error)"


@pytest.fixture(scope="module", autouse=True)
def _ship_this_module():
    # Ray workers cannot import tests/ modules: send this module's tasks by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    isolate.close_driver_hosts()


class FailingTask(TrainTask):
    """A linear fit whose rank 0 raises a user error at step `fail_at` (None: never)."""

    fail_at: int | None = 1

    def build_model(self):
        return nn.Linear(4, 1)

    def train_batches(self, ctx):
        for i in range(ctx.start_batch, 4):
            x = torch.randn(4, 4, generator=torch.Generator().manual_seed(ctx.rank * 10 + i))
            yield {"x": x, "y": x.sum(1, keepdim=True)}

    def loss(self, model, batch, ctx):
        if ctx.rank == 0 and ctx.step == self.fail_at:
            raise DataError(PLANTED)
        return nn.functional.mse_loss(model(batch["x"]), batch["y"]), {}


class PassingTask(FailingTask):
    fail_at = None


def _cfg(out: Path, steps: int) -> TrainConfig:
    return build_config(TrainConfig, {"out_dir": str(out), "schedule": {"total_steps": steps, "warmup_steps": 1},
                                      "log_every": 2, "checkpoint": {"every_steps": 2, "keep": 1}, "max_failures": 0,
                                      "scaling": {"num_workers": 1, "cpus_per_worker": 0.5}})


def _abort_once(marker: str) -> int:
    """Abort this process, as Ray's failed check does, the first time; afterwards answer with the Ray it joined."""
    if not os.path.exists(marker):
        Path(marker).write_text("aborted once")
        os.abort()
    return ray.get(ray.put(os.getpid()))


def test_a_subscriber_crash_in_the_run_driver_leaves_the_caller_alive_and_reruns(ray_local, tmp_path):
    # the first driver host aborts mid-call; the caller lives, warns in one line and reruns in a new host
    with pytest.warns(RuntimeWarning, match=r"died with signal SIGABRT; rerunning the probe") as warned:
        host_pid = run_in_driver_host(_abort_once, str(tmp_path / "once"), what="the probe")
    assert host_pid != os.getpid() and "\n" not in str(warned[0].message)
    # every try aborting: after `retries` reruns a one-line error, and this process still talks to its Ray
    with pytest.raises(DriverHostDied, match=r"^the Ray Train driver process \(pid \d+\) died with signal SIGABRT"):
        run_in_driver_host(os.abort, retries=0)
    assert ray_local.get(ray_local.put("caller alive")) == "caller alive"


def test_a_failed_train_run_cannot_abort_the_driver_subscriber_crash(ray_local, tmp_path):
    # a worker's user error: torn down in the driver host, back here as its one line (not Ray's wrapper)
    with pytest.raises(DataError) as e:
        fit(FailingTask, _cfg(tmp_path / "bad", 3), name="bad")
    assert str(e.value) == PLANTED
    # then, in the same session, a run that succeeds; the same driver host (not this process) drove both
    hosts_before = [h.proc.pid for h in isolate._idle]
    good = fit(PassingTask, _cfg(tmp_path / "good", 2), name="good")
    assert good["step"] == 2 and Path(good["checkpoint"]).is_dir()
    assert [h.proc.pid for h in isolate._idle] == hosts_before and os.getpid() not in hosts_before


# A caller that drives one call in a driver host; the call writes the host's pid, then waits.
CALLER = """
import os, sys, time
from pathlib import Path
import ray
from clipdense.train.isolate import run_in_driver_host

def mark_and_wait(path):
    Path(path).write_text(str(os.getpid()))
    time.sleep(600)

ray.init(address=sys.argv[1], log_to_driver=False)
run_in_driver_host(mark_and_wait, sys.argv[2])
"""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"   # exited, not yet reaped
    except FileNotFoundError:
        return True


def test_a_driver_host_ends_with_its_killed_caller(ray_local, tmp_path):
    """A caller killed mid-run (SIGKILL, or a head machine lost with its driver) takes its driver host with it: an
    orphaned host went on driving a run nobody waits for, retrying the lost cluster at full CPU."""
    marker = tmp_path / "host.pid"
    caller = subprocess.Popen([sys.executable, "-c", CALLER, ray_local.get_runtime_context().gcs_address,
                               str(marker)])
    try:
        deadline = time.time() + 120
        while not marker.is_file() and caller.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert marker.is_file(), f"the call never started in a driver host (caller rc {caller.poll()})"
        host = int(marker.read_text())
        assert not _gone(host)
    finally:
        caller.kill()
        caller.wait(30)
    deadline = time.time() + 10
    while not _gone(host) and time.time() < deadline:
        time.sleep(0.2)
    assert _gone(host), f"driver host {host} outlived its killed caller"
