"""The whole cluster dies mid-run (head included), a new one starts, the same command is rerun: pretraining resumes
from its checkpoint on s3:// and a sweep restores its Tune experiment from s3:// (the loopback S3 server).

Each phase runs on its own `clipdense cluster up --local` cluster (a head with CPUs of its own, no worker nodes:
what dies here is the head). The job driver is a subprocess, killed with the cluster, as on a head machine that
goes away. The local run directory of the pretraining run is deleted before the rerun: only S3 carries state.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from pretrain_files import write_world

from clipdense.config import build_config, configs_dir, read_yaml
from clipdense.jobs.cluster import down_local, free_port, up_local
from clipdense.pretrain import PretrainConfig

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def head_cluster(tmp_path):
    """start() -> a fresh single-node local cluster (head: 4 CPUs); every cluster started is stopped at the end."""
    started: list[Path] = []
    config = yaml.safe_load((ROOT / "cluster" / "local.yaml").read_text())
    config["available_node_types"]["ray.head.default"]["resources"] = {"CPU": 4}
    for name, node in config["available_node_types"].items():
        if name != "ray.head.default":
            node["max_workers"] = 0
    config["max_workers"] = 0
    (tmp_path / "head.yaml").write_text(yaml.safe_dump(config))

    def start():
        temp = Path(tempfile.mkdtemp(prefix="cdh", dir="/tmp")) / "r"
        started.append(temp)
        return up_local(tmp_path / "head.yaml", temp, port=free_port(), dashboard_port=free_port(), auth=False)

    yield start
    for temp in started:
        down_local(temp, grace_s=5)
        shutil.rmtree(temp.parent, ignore_errors=True)


def _driver(cluster, argv: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, RAY_ADDRESS=cluster.gcs_address, RAY_AUTH_MODE="disabled")
    code = f"import sys; from clipdense.cli import main; sys.exit(main({argv!r}))"
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=open(log, "a"), stderr=subprocess.STDOUT,
                            cwd=ROOT)


def _kill_head(cluster, driver: subprocess.Popen) -> None:
    """The head machine goes away: its driver and every process of the cluster."""
    driver.kill()
    driver.wait(30)
    down_local(cluster.temp_dir, grace_s=2)


def _wait(pred, timeout_s: float, what: str, driver: subprocess.Popen, log: Path):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        found = pred()
        if found:
            return found
        if driver.poll() is not None:
            raise AssertionError(f"the driver ended (rc {driver.returncode}) before {what}:\n"
                                 f"{log.read_text()[-3000:]}")
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")


def _s3(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint)


def _checkpoint_steps(s3, bucket: str, prefix: str) -> list[int]:
    """Steps of the checkpoints Ray Train wrote under s3://bucket/prefix (dirs `step_XXXXXXXX` holding our state)."""
    found = s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return sorted({int(o["Key"].split("/step_")[1][:8]) for o in found if o["Key"].endswith("/train_state.pt")})


@pytest.mark.timeout(600)
def test_pretrain_resumes_from_s3_checkpoint_after_head_restart(s3_server, head_cluster, tmp_path):
    s3 = _s3(s3_server)
    s3.create_bucket(Bucket="ckpt")
    world = write_world(tmp_path / "world", n_shards=2, per_shard=40, bad=True)
    out = tmp_path / "run"
    cfg = build_config(PretrainConfig, {
        "model": {"name": "clip-tiny"}, "captions": {"policy": "real"}, "ray": {"in_process": False},
        "data": {"shards": world["shards"], "recaptions": world["recaptions"], "batch_size": 8,
                 "decode_cpus": 0.5, "count_errors": False},
        "eval": {"holdout": 0},
        "train": {"out_dir": str(out), "name": "pretrain-s3", "schedule": {"total_steps": 16, "warmup_steps": 2},
                  "log_every": 4, "optim": {"lr": 2e-3},
                  "checkpoint": {"every_steps": 4, "keep": 2, "storage": "s3://ckpt/runs",
                                 "s3_endpoint": s3_server},
                  "scaling": {"num_workers": 2, "cpus_per_worker": 1.0}}})
    cfg_file = tmp_path / "pretrain.yaml"
    cfg_file.write_text(cfg.to_yaml())
    argv, log = ["pretrain", "--config", str(cfg_file)], tmp_path / "driver.log"

    first = head_cluster()
    driver = _driver(first, argv, log)
    # two checkpoints: Ray Train has registered the first in its run state by the time it writes the second
    _wait(lambda: len(_checkpoint_steps(s3, "ckpt", "runs/pretrain-s3/")) >= 2, 420, "2 checkpoints on S3",
          driver, log)
    _kill_head(first, driver)
    saved = _checkpoint_steps(s3, "ckpt", "runs/pretrain-s3/")
    assert len(saved) >= 2 and max(saved) < 16, saved
    shutil.rmtree(out)                                   # a new head machine: no local state at all

    second = head_cluster()
    driver = _driver(second, argv, log)
    assert driver.wait(420) == 0, log.read_text()[-3000:]
    summary = json.loads((out / "pretrain_summary.json").read_text())
    assert summary["step"] == 16 and not summary["stopped_early"]
    restored = summary["restored_from_steps"]
    assert len(restored) == 1 and restored[0] in saved[-2:], (restored, saved)  # the last registered checkpoint
    assert summary["checkpoint"] == "s3://ckpt/runs/pretrain-s3/step_00000016"
    assert 16 in _checkpoint_steps(s3, "ckpt", "runs/pretrain-s3/")
    events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if "loss" in e][0] > restored[0]  # nothing before the checkpoint retrained


@pytest.mark.timeout(600)
def test_sweep_restores_from_s3_after_head_restart(s3_server, head_cluster, ade_root, tmp_path):
    """Two trials one after the other; the cluster dies once the first has finished. The rerun restores the Tune
    experiment from S3 and runs only the second."""
    s3 = _s3(s3_server)
    s3.create_bucket(Bucket="sweeps")
    data = read_yaml(configs_dir() / "sweep" / "data-efficiency-tiny.yaml")
    data.update({"out": str(tmp_path / "sweep"), "verbose": 0, "storage": "s3://sweeps/tune",
                 "s3_endpoint": s3_server, "backbones": data["backbones"][:1], "report": {"reference": None},
                 "resources": {"max_concurrent_trials": 1}})
    data["tasks"][0]["overrides"].update({"data.root": str(ade_root), "ray.in_process": True})
    cfg_file = tmp_path / "sweep.yaml"
    cfg_file.write_text(yaml.safe_dump(data))
    argv, log = ["sweep", "--config", str(cfg_file)], tmp_path / "driver.log"
    trials = tmp_path / "sweep" / "trials"

    first = head_cluster()
    driver = _driver(first, argv, log)
    done = _wait(lambda: sorted(trials.glob("seg/*/*/s0/metrics.json")), 360, "the first trial", driver, log)
    _kill_head(first, driver)
    assert len(done) == 1, done
    mtime = done[0].stat().st_mtime_ns
    state = s3.list_objects_v2(Bucket="sweeps", Prefix="tune/").get("Contents", [])
    assert any("experiment_state" in o["Key"] for o in state), [o["Key"] for o in state]

    second = head_cluster()
    driver = _driver(second, argv, log)
    assert driver.wait(420) == 0, log.read_text()[-3000:]
    printed = log.read_text()
    assert '"restored": "s3://sweeps/tune/' in printed and '"failed": []' in printed, printed[-3000:]
    assert done[0].stat().st_mtime_ns == mtime                   # the finished trial was not rerun
    assert len(sorted(trials.glob("seg/*/*/s0/metrics.json"))) == 2
