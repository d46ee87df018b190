"""Shared fixtures: one real local Ray cluster per test session, and a real S3-compatible server on loopback."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
from xdist_crashes import CrashReruns, record_worker_pid

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# No test drains a node: Ray Train's preemption watcher would be one more actor process per run (~1.5 CPU-s of
# imports each, ~18 runs a suite). Inherited by the Ray clusters and drivers the tests start.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    """Under xdist: each worker records its pid; the controller schedules with the crash fixes (xdist_crashes)."""
    if hasattr(config, "workerinput"):
        record_worker_pid(config.workerinput)
    elif config.pluginmanager.has_plugin("dsession"):
        config.pluginmanager.register(CrashReruns(frozenset(CLUSTER_MODULES)), "clipdense-crash-reruns")


# The modules that run multi-node clusters for minutes. Two at once put 20+ processes on 2 cores and each ran about
# twice as long, so the scheduler (xdist_crashes) never runs two of them at once, and they go first: one worker
# takes them one after another while the other works through the rest.
CLUSTER_MODULES = ("test_pretrain_elastic.py", "test_head_restart.py", "test_cluster_faults.py",
                   "test_cluster_local.py")


def _cluster_modules_first(items):
    rank = {name: i for i, name in enumerate(CLUSTER_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def pytest_collection_modifyitems(config, items):
    _cluster_modules_first(items)
    if _cuda():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _start_local_ray():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_DEDUP_LOGS": "0"}})
    return ray


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray cluster. 4 logical CPUs on 2 cores: Ray Data inside Ray Train needs CPUs beside the workers."""
    yield _start_local_ray()
    import ray

    ray.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """moto in server mode on loopback: a real HTTP S3 endpoint (not an in-process mock). Yields the endpoint URL."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": url}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield url
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory):
    """A tiny synthetic ADE20k folder (16 train, 4 val images), once per test module."""
    from clipdense.synth import SynthConfig
    from clipdense.synth import run as synth

    out = tmp_path_factory.mktemp("synth")
    synth(SynthConfig(out=str(out), preset="tiny", workers=1, web_images=0, nyu_train=0, nyu_test=0,
                      coco_train=0, coco_val=0, ade_train=16, ade_val=4))
    return out / "ade"
