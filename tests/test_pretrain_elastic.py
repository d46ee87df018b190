"""Elastic pretraining (train.scaling.min_workers < num_workers): a run that loses a node goes on with fewer workers
at the same global step with the same global batch, grows back to the full count when a node returns, and from each
checkpoint on trains every sample of the epoch once. One fake-multinode test covers both resizes.

Global batch b of an epoch is the stream's rows [b * G, (b + 1) * G) whatever the worker count, and every epoch
streams the same rows in the same order (no shuffle here), so "every sample once, in place" is checked as: each
global batch of a later epoch holds exactly the keys of the same batch of epoch 0, and no key repeats within an
epoch. `data.sample_log` records what each rank trained at each step.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
from cluster_files import FAST_NODE_DEATH_ENV
from pretrain_files import write_world
from ray_train_state import registered_checkpoint_step

from clipdense.config import ConfigError, build_config
from clipdense.pretrain import PretrainConfig

GLOBAL_BATCH = 8
BATCHES_PER_EPOCH = 4  # the world below: 37 usable rows


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    # 37 usable rows: 4 global batches of 8 per epoch (5 rows left over), so 12 steps are 3 epochs
    return write_world(tmp_path_factory.mktemp("world"), n_shards=2, per_shard=20, bad=True)


def elastic_cfg(world, out, *, total=12, cpus_per_worker=1.0, extra_train=None, **top) -> PretrainConfig:
    train = {"out_dir": str(out), "optim": {"lr": 2e-3}, "schedule": {"total_steps": total, "warmup_steps": 2},
             "log_every": 3, "checkpoint": {"every_steps": 3, "keep": 2}, "max_failures": 3,
             "scaling": {"num_workers": 2, "min_workers": 1, "cpus_per_worker": cpus_per_worker}}
    train.update(extra_train or {})
    doc = {"model": {"name": "clip-tiny"}, "captions": {"policy": "real"}, "ray": {"in_process": False},
           "data": {"shards": world["shards"], "recaptions": world["recaptions"], "batch_size": GLOBAL_BATCH,
                    "decode_cpus": 0.25, "sample_log": True, "count_errors": False},
           "eval": {"holdout": 0}, "train": train}
    doc.update(top)
    return build_config(PretrainConfig, doc)


def trained_steps(out: Path) -> dict[int, list[dict]]:
    """step -> the records of the last worker group that trained it (a replayed step: the later group's)."""
    by_step: dict[int, list[dict]] = defaultdict(list)
    for f in sorted((out / "samples").glob("rank*.jsonl")):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            by_step[rec["step"]].append(rec)
    final = {}
    for step, recs in by_step.items():
        recs.sort(key=lambda r: r["time"])
        world = recs[-1]["world_size"]
        last: dict[int, dict] = {}
        for r in reversed(recs):  # the newest record of each rank of the last group
            if r["world_size"] == world and r["rank"] not in last:
                last[r["rank"]] = r
        final[step] = [last[k] for k in sorted(last)]
    return final


def check_every_sample_once(out: Path, total: int) -> dict[int, int]:
    """Asserts the promise over the whole run; returns step -> world size that trained it."""
    steps = trained_steps(out)
    assert sorted(steps) == list(range(total)), "steps trained: not exactly 0..total-1"
    batches: dict[tuple[int, int], list[str]] = {}
    per_epoch: dict[int, list[str]] = defaultdict(list)
    batch_in_epoch: dict[int, int] = defaultdict(int)
    for step in range(total):
        recs = steps[step]
        world = recs[0]["world_size"]
        assert [r["rank"] for r in recs] == list(range(world)), f"step {step}: ranks {[r['rank'] for r in recs]}"
        assert all(len(r["keys"]) == GLOBAL_BATCH // world for r in recs), f"step {step}: per-worker batch"
        keys = [k for r in recs for k in r["keys"]]
        assert len(keys) == GLOBAL_BATCH == len(set(keys)), f"step {step}: global batch {keys}"
        epoch = recs[0]["epoch"]
        batches[epoch, batch_in_epoch[epoch]] = keys
        batch_in_epoch[epoch] += 1
        per_epoch[epoch] += keys
    for epoch, keys in per_epoch.items():
        assert len(keys) == len(set(keys)), f"epoch {epoch}: a sample trained twice"
    full = [e for e in per_epoch if e < max(per_epoch)]  # epochs the run finished: the same rows, none skipped
    assert len({frozenset(per_epoch[e]) for e in full}) <= 1 and len({batch_in_epoch[e] for e in full}) <= 1
    for (epoch, b), keys in batches.items():  # the same rows at the same place in every epoch
        assert keys == batches[0, b], f"epoch {epoch} batch {b}: {keys} != epoch 0's {batches[0, b]}"
    return {s: recs[0]["world_size"] for s, recs in steps.items()}


def test_global_batch_must_divide_every_elastic_worker_count(world, tmp_path):
    with pytest.raises(ConfigError, match=r"divisible by every worker count .*1\.\.3.*not by 2") as e:
        build_config(PretrainConfig, {"data": {"shards": world["shards"], "batch_size": 9},
                                      "train": {"scaling": {"num_workers": 3, "min_workers": 1}}})
    assert len(str(e.value).splitlines()) == 1
    elastic_cfg(world, tmp_path)  # 8 splits over 1 and 2 workers


def test_shuffle_buffer_is_refused_in_elastic_mode(world, tmp_path):
    """A local shuffle buffer is filled from each worker's split of the stream: after a resize mid-epoch the new
    splits refill it differently, so an epoch would repeat some samples and skip others. Refused in one line."""
    with pytest.raises(ConfigError, match=r"data\.shuffle_buffer cannot be used with an elastic run") as e:
        elastic_cfg(world, tmp_path, data={"shards": world["shards"], "recaptions": world["recaptions"],
                                           "batch_size": GLOBAL_BATCH, "shuffle_buffer": 16})
    assert len(str(e.value).splitlines()) == 1
    fixed = elastic_cfg(world, tmp_path, data={"shards": world["shards"], "batch_size": GLOBAL_BATCH,
                                               "shuffle_buffer": 16},
                        extra_train={"scaling": {"num_workers": 2, "min_workers": 2}})
    assert fixed.data.shuffle_buffer == 16  # a fixed-size run keeps its shuffle


NODE_CONFIG = {  # the head runs the driver and Train's controller; each 3-CPU node fits one 2-CPU train worker
    # and its share of Ray Data's read tasks (1 CPU each). (The autoscaler does not replace a SIGKILLed fake node:
    # the test starts one itself.)
    "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
    "train_node": {"resources": {"CPU": 3}, "node_config": {}, "min_workers": 2, "max_workers": 2},
}
GROW_TOTAL = 24


def _kill_node_of(pid: int) -> list[int]:
    """SIGKILL the fake node hosting process `pid`: its raylet (worker processes are the raylet's children) and
    every process under it (the node's workers and agents). Returns the pids killed."""
    import psutil
    import ray  # noqa: F401  (puts Ray's vendored psutil on the path)

    raylet = next(p for p in psutil.Process(pid).parents() if "raylet" in " ".join(p.cmdline()))
    victims = [raylet, *raylet.children(recursive=True)]
    for p in victims:
        try:
            p.kill()
        except psutil.Error:
            pass
    return [p.pid for p in victims]


def _kill_when_both_train_past_a_checkpoint(out: Path, driver, deadline: float):
    """Kills rank 1's node once Ray Train has registered the step-6 checkpoint and both workers train past it;
    returns (the step trained then, the registered step)."""
    while driver.poll() is None and time.time() < deadline:
        time.sleep(0.2)
        steps = trained_steps(out) if (out / "samples").is_dir() else {}
        done = max(steps, default=-1)
        ranks = {r["rank"]: r["pid"] for r in steps.get(done, [])}
        registered = registered_checkpoint_step(out)
        if registered >= 6 and done > registered and len(ranks) == 2:
            _kill_node_of(ranks[1])
            return done, registered
    return None


def _stop_joined_node(joined: subprocess.Popen) -> None:
    """`ray start --block` and every process under it (its raylet, agents and workers)."""
    import psutil
    import ray  # noqa: F401  (puts Ray's vendored psutil on the path)

    from clipdense.jobs.cluster import kill_and_wait

    try:
        root = psutil.Process(joined.pid)
        kill_and_wait([root, *root.children(recursive=True)], timeout_s=10)
    except psutil.NoSuchProcess:
        pass
    joined.wait(10)


def _pause_the_lone_worker_until_the_group_grows(out: Path, driver, deadline: float, node_back) -> int | None:
    """Once the one worker left has trained past a checkpoint of its own that Ray Train registered, SIGSTOP it
    until Ray Train stops it to grow the group (a pacing device: alone it would finish the run in seconds); the
    node comes back (`node_back()`) while it is paused. Returns the step it had trained, None if it never got
    there."""
    import psutil
    import ray  # noqa: F401  (puts Ray's vendored psutil on the path)

    paused = None
    try:
        while driver.poll() is None and time.time() < deadline:
            time.sleep(0.2)
            steps = trained_steps(out)
            done = max(steps, default=-1)
            alone = [r for r in steps.get(done, []) if r["world_size"] == 1]
            resumed = [s for s, recs in steps.items() if recs[0]["world_size"] == 1]
            if paused is None and alone and registered_checkpoint_step(out) > min(resumed) and \
                    done > registered_checkpoint_step(out):
                paused = psutil.Process(alone[0]["pid"])
                paused.suspend()
                stepped = done
                node_back()
            if paused is not None and not paused.is_running():
                return stepped                   # ended by the resize
    finally:
        if paused is not None and paused.is_running():
            paused.resume()
    return None


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_lost_node_then_grow_back_on_fake_multinode_cluster(world, tmp_path, monkeypatch):
    """`clipdense cluster up --local` with two 3-CPU worker nodes; rank 1's whole node is SIGKILLed once Ray Train
    has registered the step-6 checkpoint. The run goes on with the one worker that fits; the autoscaler replaces
    the node, Ray Train's elastic policy sees room for two again (train.scaling.resize_interval_s, lowered here
    from 60 s) and grows the group back from the last checkpoint; the run ends at step 24 on two workers, every
    sample of each epoch trained once apart from replayed steps. (train.scaling.start_timeout_s, lowered from
    60 s: how long Ray Train retries the old size before starting the group at the size that fits.) The lone
    worker is paused once it has trained past its own checkpoint, until the resize stops it: see
    _pause_the_lone_worker_until_the_group_grows."""
    import shutil
    import tempfile

    import yaml

    from clipdense.jobs.cluster import down_local, free_port, up_local

    for k, v in FAST_NODE_DEATH_ENV.items():
        monkeypatch.setenv(k, v)
    # the paused worker cannot answer Ray Train's process-group shutdown before the resize: 2 s, not 30 s, of waiting
    monkeypatch.setenv("TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S", "2")
    ray_tmp = Path(tempfile.mkdtemp(prefix="cde", dir="/tmp"))
    local = yaml.safe_load((Path(__file__).resolve().parents[1] / "cluster" / "local.yaml").read_text())
    local.update({"available_node_types": NODE_CONFIG, "max_workers": 2, "idle_timeout_minutes": 5})
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(local))
    out = tmp_path / "run"
    scaling = {"num_workers": 2, "min_workers": 1, "cpus_per_worker": 2.0, "resize_interval_s": 1,
               "start_timeout_s": 5}
    cfg = elastic_cfg(world, out, total=GROW_TOTAL, extra_train={"max_failures": 3, "scaling": scaling})
    (tmp_path / "pretrain.yaml").write_text(cfg.to_yaml())
    driver = joined = None
    try:
        cluster = up_local(tmp_path / "cluster.yaml", ray_tmp / "r", port=free_port(), dashboard_port=free_port(),
                           auth=False)
        env = dict(os.environ, RAY_ADDRESS=cluster.gcs_address, RAY_AUTH_MODE="disabled")
        driver = subprocess.Popen([sys.executable, "-c", "import sys; from clipdense.cli import main; "
                                   f"sys.exit(main(['pretrain', '--config', '{tmp_path / 'pretrain.yaml'}']))"],
                                  env=env, stdout=open(tmp_path / "driver.log", "w"), stderr=subprocess.STDOUT)
        deadline = time.time() + 480
        killed = _kill_when_both_train_past_a_checkpoint(out, driver, deadline)
        assert killed, ("never saw both workers train past a registered step-6 checkpoint:\n"
                        f"{(tmp_path / 'driver.log').read_text()[-3000:]}")
        def node_back():  # a machine joins the cluster again: a 3-CPU node like the one lost
            nonlocal joined
            joined = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--block",
                                       f"--address={cluster.gcs_address}", "--num-cpus=3", "--disable-usage-stats"],
                                      env=env, stdout=open(tmp_path / "node.log", "w"), stderr=subprocess.STDOUT,
                                      start_new_session=True)

        alone = _pause_the_lone_worker_until_the_group_grows(out, driver, deadline, node_back)
        rc = driver.wait(max(10, deadline - time.time()))
        log = (tmp_path / "driver.log").read_text()
        assert rc == 0, log[-3000:]
        assert alone is not None, f"the one worker left never trained past a checkpoint of its own:\n{log[-3000:]}"
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
        if joined is not None:
            _stop_joined_node(joined)
        down_local(ray_tmp / "r", grace_s=5)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    summary = json.loads((out / "pretrain_summary.json").read_text())
    assert summary["step"] == GROW_TOTAL and not summary["stopped_early"]
    worlds = check_every_sample_once(out, GROW_TOTAL)
    events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    resume_events = [e for e in events if e.get("event") == "resume"]
    resumes = [(e["step"], e["world_size"]) for e in resume_events]
    # each restore goes on at its step's place in the epoch, whatever the worker count
    assert [(e["epoch"], e["batch_in_epoch"]) for e in resume_events] == \
        [divmod(e["step"], BATCHES_PER_EPOCH) for e in resume_events]
    # back to the newest checkpoint registered before the kill (step 6, or 9 if it came first), on the node left
    assert resumes and resumes[0][1] == 1 and killed[1] <= resumes[0][0] <= killed[0] + 1, (resumes, killed)
    assert {worlds[s] for s in range(resumes[0][0])} == {2}
    assert len(resumes) == 2 and resumes[1][1] == 2, f"the group never grew back to two workers: {resumes}"
    shrunk, grown = resumes[0][0], resumes[1][0]
    assert shrunk < grown <= alone + 1, (resumes, alone)       # from a checkpoint the one worker wrote
    assert {worlds[s] for s in range(shrunk, grown)} == {1}    # it continued on fewer workers ...
    assert {worlds[s] for s in range(grown, GROW_TOTAL)} == {2}  # ... and finished on the full count
