"""Helpers for tests that start their own local autoscaling cluster (`clipdense cluster up --local`)."""
from __future__ import annotations

import contextlib
import secrets
import shutil
import tempfile
import time
from pathlib import Path

from clipdense.jobs import cluster as local
from clipdense.jobs.client import make_client

ROOT = Path(__file__).resolve().parents[1]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# For clusters whose tests kill nodes: the GCS marks a node dead after 3 missed 1 s health checks (Ray's default:
# 5 missed 3 s checks), so what reacts to the loss starts ~12 s sooner. Set in the environment `up` runs in.
FAST_NODE_DEATH_ENV = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}


def wait_until(pred, timeout_s: float, what: str, poll_s: float = 1.0):
    deadline = time.time() + timeout_s
    last = None
    while time.time() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} (last: {last!r})")


@contextlib.contextmanager
def local_cluster(config: str | Path = ROOT / "cluster" / "local.yaml"):
    """A fresh local cluster (short temp dir, free ports, own token): yields (LocalCluster, JobSubmissionClient)
    and stops exactly its processes afterwards."""
    short = Path(tempfile.mkdtemp(prefix="cdr", dir="/tmp"))  # Ray's socket paths under it stay short
    token = short / "token"
    token.write_text(secrets.token_hex(32))
    state = None
    try:
        state = local.up_local(config, short / "r", local.free_port(), local.free_port(), str(token))
        yield state, make_client(state.dashboard_url, str(token))
    finally:
        local.down_local(short / "r")
        left = local.cluster_processes(state.temp_dir, state.pgid, state.gcs_address) if state else []
        shutil.rmtree(short, ignore_errors=True)
    assert left == [], f"processes of the cluster left behind: {left}"  # checked only when the body passed


def worker_nodes(state: local.LocalCluster) -> list[dict]:
    return [n for n in local.alive_nodes(state.dashboard_url, state.token_path) if not n["is_head_node"]]


def wait_job(client, job_id: str, timeout_s: float) -> str:
    return wait_until(lambda: (s := str(client.get_job_status(job_id).value)) in TERMINAL and s, timeout_s,
                      f"job {job_id} to end", poll_s=1.0)


def state_api(state: local.LocalCluster, what: str) -> list[dict]:
    """Rows of the dashboard's state API (`actors`, `nodes`, ...), all states."""
    import requests

    from clipdense.jobs.client import read_token

    r = requests.get(f"{state.dashboard_url}/api/v0/{what}", params={"limit": 10000, "detail": "true"},
                     headers={"Authorization": f"Bearer {read_token(state.token_path)}"}, timeout=30)
    r.raise_for_status()
    return r.json()["data"]["result"]["result"]


def kill_node(state: local.LocalCluster, node_id: str) -> list[int]:
    """SIGKILL one fake worker node as a lost machine: its raylet and everything under it (workers, agents) at
    once. The fake provider starts each node's raylet with RAY_OVERRIDE_NODE_ID_FOR_TESTING=<node id>."""
    import psutil  # importing clipdense.jobs.cluster imported ray, which puts its vendored psutil on sys.path

    raylets = []
    for p in local.cluster_processes(state.temp_dir, state.pgid, state.gcs_address):
        try:
            if p.name() == "raylet" and p.environ().get("RAY_OVERRIDE_NODE_ID_FOR_TESTING") == node_id:
                raylets.append(p)
        except psutil.Error:
            continue
    assert len(raylets) == 1, f"expected one raylet for node {node_id}, found {raylets}"
    procs = [raylets[0], *raylets[0].children(recursive=True)]
    local.kill_and_wait(procs, timeout_s=10)
    return [p.pid for p in procs]
