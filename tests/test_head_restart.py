"""The whole cluster dies mid-run (head included), a new one starts, the same command is rerun: pretraining resumes
from its checkpoint on s3://, recaptioning skips the shards it had written and a sweep restores its Tune experiment
from s3:// (the loopback S3 server).

Each phase runs on a `clipdense cluster up --local` cluster (a head with CPUs of its own, no worker nodes: what
dies here is the head); the cluster a test restarts onto is the one the next test loses (`Heads`). The job driver
is a subprocess, killed with the cluster, as on a head machine that goes away. The local run directory of the
pretraining run is deleted before the rerun: only S3 carries state.
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

import pyarrow.parquet as pq
import pytest
import yaml
from pretrain_files import write_world
from shard_files import write_shard_set

from clipdense.config import build_config, configs_dir, read_yaml
from clipdense.jobs.cluster import down_local, free_port, up_local
from clipdense.pretrain import PretrainConfig

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


class Heads:
    """The module's chain of single-node local clusters (head: 4 CPUs): `live()` is the cluster running now (one is
    started when there is none), `lose(driver)` kills it with its driver. Each test takes the cluster the previous
    test restarted onto as the one that dies, so three restart tests start four clusters, not six."""

    def __init__(self, config: Path):
        self.config, self.started, self.current = config, [], None

    def live(self):
        if self.current is None:
            temp = Path(tempfile.mkdtemp(prefix="cdh", dir="/tmp")) / "r"
            self.started.append(temp)
            self.current = up_local(self.config, temp, port=free_port(), dashboard_port=free_port(), auth=False)
        return self.current

    def lose(self, driver: subprocess.Popen) -> None:
        """The head machine goes away: its driver and every process of the cluster."""
        driver.kill()
        driver.wait(30)
        down_local(self.current.temp_dir, grace_s=2)
        self.current = None


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    config = yaml.safe_load((ROOT / "cluster" / "local.yaml").read_text())
    config["available_node_types"]["ray.head.default"]["resources"] = {"CPU": 4}
    for name, node in config["available_node_types"].items():
        if name != "ray.head.default":
            node["max_workers"] = 0
    config["max_workers"] = 0
    path = tmp_path_factory.mktemp("heads") / "head.yaml"
    path.write_text(yaml.safe_dump(config))
    chain = Heads(path)
    yield chain
    for temp in chain.started:
        down_local(temp, grace_s=5)
        shutil.rmtree(temp.parent, ignore_errors=True)


def _driver(cluster, argv: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, RAY_ADDRESS=cluster.gcs_address, RAY_AUTH_MODE="disabled")
    code = f"import sys; from clipdense.cli import main; sys.exit(main({argv!r}))"
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=open(log, "a"), stderr=subprocess.STDOUT,
                            cwd=ROOT)


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
def test_pretrain_resumes_from_s3_checkpoint_after_head_restart(s3_server, heads, tmp_path):
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
                  # one worker: what is under test is the restore from S3 on a new head, not the group size
                  "scaling": {"num_workers": 1, "cpus_per_worker": 1.0}}})
    cfg_file = tmp_path / "pretrain.yaml"
    cfg_file.write_text(cfg.to_yaml())
    argv, log = ["pretrain", "--config", str(cfg_file)], tmp_path / "driver.log"

    driver = _driver(heads.live(), argv, log)
    # two checkpoints: Ray Train has registered the first in its run state by the time it writes the second
    _wait(lambda: len(_checkpoint_steps(s3, "ckpt", "runs/pretrain-s3/")) >= 2, 420, "2 checkpoints on S3",
          driver, log)
    heads.lose(driver)
    saved = _checkpoint_steps(s3, "ckpt", "runs/pretrain-s3/")
    assert len(saved) >= 2 and max(saved) < 16, saved
    shutil.rmtree(out)                                   # a new head machine: no local state at all

    driver = _driver(heads.live(), argv, log)
    assert driver.wait(420) == 0, log.read_text()[-3000:]
    summary = json.loads((out / "pretrain_summary.json").read_text())
    assert summary["step"] == 16 and not summary["stopped_early"]
    restored = summary["restored_from_steps"]
    assert len(restored) == 1 and restored[0] in saved[-2:], (restored, saved)  # the last registered checkpoint
    assert summary["checkpoint"] == "s3://ckpt/runs/pretrain-s3/step_00000016"
    assert 16 in _checkpoint_steps(s3, "ckpt", "runs/pretrain-s3/")
    events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if "loss" in e][0] > restored[0]  # nothing before the checkpoint retrained


def _written(out: Path) -> dict[str, int]:
    return {f.name: f.stat().st_mtime_ns for f in out.glob("*.parquet")} if out.is_dir() else {}


@pytest.mark.timeout(600)
def test_recaption_after_losing_the_head_skips_finished_shards_and_writes_each_key_once(heads, tmp_path):
    """The job driver lives on the head: the head dies once some shards are written (echo engine, slowed to 1 s a
    batch), a new head starts and the same command runs again. Shards written before are skipped (not rewritten),
    the rest are captioned, and every key is in its shard's file exactly once, in input order."""
    expected = write_shard_set(tmp_path / "in", n_shards=6, per_shard=24)
    out = tmp_path / "out"
    argv = ["recaption", "--config", str(ROOT / "configs/recaption/echo.yaml"), f"input={tmp_path / 'in'}",
            f"output={out}", "engine.concurrency=1", "engine.num_cpus=1", "engine.batch_size=8",
            "engine.num_captions=2", "fault.engine_delay_s=1.0", "decode.size=32", "stats.enabled=false"]
    log = tmp_path / "driver.log"
    driver = _driver(heads.live(), argv, log)
    _wait(lambda: len(_written(out)) >= 1, 300, "a first shard written", driver, log)
    heads.lose(driver)
    before = _written(out)
    assert 1 <= len(before) < len(expected), before

    driver = _driver(heads.live(), argv, log)
    assert driver.wait(300) == 0, log.read_text()[-3000:]
    after = _written(out)
    assert sorted(after) == sorted(expected)
    assert {f: after[f] for f in before} == before                    # finished shards were not rewritten
    printed = log.read_text()
    summary, _ = json.JSONDecoder().raw_decode(printed[printed.rindex("\n{") + 1:])  # the rerun's summary
    assert summary["shards"] == {"total": 6, "skipped_done": len(before), "written": 6 - len(before)}, summary
    for name, keys in expected.items():                                # every key exactly once, in input order
        rows = pq.read_table(out / name).to_pylist()
        assert [r["key"] for r in rows] == keys and all(r["error_code"] is None for r in rows)


@pytest.mark.timeout(600)
def test_sweep_restores_from_s3_after_head_restart(s3_server, heads, ade_root, tmp_path):
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

    driver = _driver(heads.live(), argv, log)
    done = _wait(lambda: sorted(trials.glob("seg/*/*/s0/metrics.json")), 360, "the first trial", driver, log)
    heads.lose(driver)
    assert len(done) == 1, done
    mtime = done[0].stat().st_mtime_ns
    state = s3.list_objects_v2(Bucket="sweeps", Prefix="tune/").get("Contents", [])
    assert any("experiment_state" in o["Key"] for o in state), [o["Key"] for o in state]

    driver = _driver(heads.live(), argv, log)
    assert driver.wait(420) == 0, log.read_text()[-3000:]
    printed = log.read_text()
    assert '"restored": "s3://sweeps/tune/' in printed and '"failed": []' in printed, printed[-3000:]
    assert done[0].stat().st_mtime_ns == mtime                   # the finished trial was not rerun
    assert len(sorted(trials.glob("seg/*/*/s0/metrics.json"))) == 2
