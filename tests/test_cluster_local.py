"""The local autoscaling cluster: `clipdense cluster up|down|status --local` and a real job through `submit`.

The slow test starts its own fake_multinode cluster (own temp dir, free ports, own token) next to whatever other
Ray instances run on this machine, and stops only that cluster's processes.
"""
from __future__ import annotations

import json
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from cluster_files import wait_until

from clipdense.jobs.cluster import (
    LocalCluster,
    alive_nodes,
    cluster_processes,
    down_local,
    free_port,
    kill_and_wait,
    main_cluster,
)
from clipdense.jobs.submit import main_submit

ROOT = Path(__file__).resolve().parents[1]
SLEEPER = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); " \
          "time.sleep(120)"


@pytest.fixture
def short_tmp():
    """A short temp dir: Ray's unix socket paths under it must stay below 107 bytes (pytest's tmp_path is long)."""
    d = Path(tempfile.mkdtemp(prefix="cdr", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_down_stops_only_this_clusters_processes(short_tmp):
    """Processes naming the temp dir, and their descendants, go; a process naming a sibling dir stays."""
    mine, other = short_tmp / "r", short_tmp / "r2"
    procs = [subprocess.Popen([sys.executable, "-c", SLEEPER, f"--temp-dir={d}"]) for d in (mine, other)]
    try:
        wait_until(lambda: len(cluster_processes(mine)) == 2, 20, "the process and its child to appear")
        pids = {p.pid for p in cluster_processes(mine)}
        assert procs[0].pid in pids and procs[1].pid not in pids
        assert down_local(mine, grace_s=5) == 2
        procs[0].wait(10)
        assert cluster_processes(mine) == []
        assert procs[1].poll() is None, "a process of another cluster was stopped"
        assert len(cluster_processes(other)) == 2
    finally:
        for p in procs:
            p.kill()
        down_local(other, grace_s=1)


def test_kill_and_wait_kills_what_ignores_sigterm_and_skips_what_is_gone():
    import psutil
    import ray  # noqa: F401  (puts its vendored psutil on sys.path)

    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                                 "signal.SIG_IGN); print(flush=True); time.sleep(120)"], stdout=subprocess.PIPE)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        stubborn.stdout.readline()  # its SIGTERM handler is set
        procs = [psutil.Process(stubborn.pid), psutil.Process(gone.pid)]
        gone.wait(10)  # reaped: psutil's kill() now meets a process that no longer exists
        kill_and_wait(procs, timeout_s=10)
        assert not procs[0].is_running()
        assert procs[0].returncode == -signal.SIGKILL  # set by psutil's wait_procs, which reaped it
    finally:
        stubborn.kill()


def test_up_refuses_bad_setups_with_one_line(short_tmp, tmp_path, capsys):
    cfg = yaml.safe_load((ROOT / "cluster" / "local.yaml").read_text())
    cfg["provider"] = {"type": "aws", "region": "us-west-2"}
    aws = tmp_path / "aws_local.yaml"
    aws.write_text(yaml.safe_dump(cfg))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        cases = [
            (["--config", str(aws)], "provider.type must be fake_multinode"),
            (["--temp-dir", "/tmp/" + "x" * 60], "too long"),
            (["--port", str(busy.getsockname()[1])], "already in use"),
            (["--config", str(tmp_path / "none.yaml")], "config file not found"),
        ]
        for extra, needle in cases:
            argv = ["up", "--local", "--temp-dir", str(short_tmp / "r"), "--port", str(free_port()), *extra]
            assert main_cluster(argv) == 2, extra
            err = capsys.readouterr().err.strip()
            assert needle in err and len(err.splitlines()) == 1, err
    assert not (short_tmp / "r" / "clipdense-cluster.json").exists()


def test_status_without_cluster(short_tmp, capsys):
    assert main_cluster(["status", "--local", "--temp-dir", str(short_tmp)]) == 2
    assert "no local cluster recorded" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_local_cluster_scales_up_runs_a_job_and_scales_down(short_tmp, capsys):
    temp = short_tmp / "r"
    token = short_tmp / "token"
    token.write_text(secrets.token_hex(32))
    up = ["up", "--local", "--temp-dir", str(temp), "--port", str(free_port()),
          "--dashboard-port", str(free_port()), "--token-file", str(token)]
    state = None
    try:
        assert main_cluster(up) == 0, capsys.readouterr().err
        state = LocalCluster.load(temp)
        url, auth = state.dashboard_url, ["--address", state.dashboard_url, "--token-file", str(token)]

        def nodes():
            return alive_nodes(url, str(token))

        assert [n["is_head_node"] for n in nodes()] == [True], "only the head before any job"

        # Token auth is on: a wrong token is refused with one clear line.
        wrong = short_tmp / "wrong"
        wrong.write_text("not-the-token")
        capsys.readouterr()
        assert main_submit(["probe", "--no-wait", *auth[:2], "--token-file", str(wrong)]) == 2
        assert "token was rejected" in capsys.readouterr().err

        # A job that needs 2 worker nodes (STRICT_SPREAD, 1 CPU each; the head has 0 CPUs).
        assert main_submit(["probe", "nodes=2", "seconds=3", "--no-wait", *auth]) == 0
        job_id = capsys.readouterr().out.strip().splitlines()[-1]
        assert job_id.startswith("raysubmit_")
        wait_until(lambda: len(nodes()) >= 3, 180, "the autoscaler to add 2 worker nodes")

        def job_status():
            capsys.readouterr()
            assert main_submit(["status", job_id, *auth]) == 0
            status = capsys.readouterr().out.split("\t")[1]
            return status if status in ("SUCCEEDED", "FAILED", "STOPPED") else None

        status = wait_until(job_status, 120, f"job {job_id} to finish", poll_s=2)
        assert main_submit(["logs", job_id, *auth]) == 0
        logs = capsys.readouterr().out
        assert status == "SUCCEEDED", logs[-2000:]
        probe = [ln for ln in logs.splitlines() if ln.startswith("PROBE ")]
        assert probe, "the job printed no PROBE line"
        result = json.loads(probe[-1][len("PROBE "):])
        assert result["distinct_nodes"] == 2  # ran on two different (worker) nodes

        # Waiting (the default) exits with the job's outcome: 0 succeeded, 1 failed (no node type has 64 CPUs).
        assert main_submit(["probe", "nodes=1", "seconds=0", *auth]) == 0
        assert main_submit(["probe", "nodes=1", "cpus=64", "timeout=2", *auth]) == 1
        assert "FAILED" in capsys.readouterr().err

        # idle_timeout_minutes 0.2: the workers go away again.
        wait_until(lambda: len(nodes()) == 1, 150, "idle worker nodes to be removed", poll_s=2)
        assert main_cluster(["status", "--local", "--temp-dir", str(temp)]) == 0
        assert "1 nodes (0 workers)" in capsys.readouterr().out
    finally:
        rc = main_cluster(["down", "--local", "--temp-dir", str(temp)])
    assert rc == 0 and state is not None
    assert cluster_processes(temp, state.pgid, state.gcs_address) == [], "processes of the cluster left behind"
    assert LocalCluster.load(temp) is None


def test_autoscaler_runs_fake_nodes_with_their_own_runtime_env_dirs():
    """Issue #23 item 0: stock fake_multinode nodes share one runtime_resources dir, and a joining node deletes the
    working_dir packages other nodes run in. `up` hands the autoscaler our subclass, which differs from Ray's
    provider only by a runtime_env dir per node (a drift guard: same RayParams arguments otherwise)."""
    import ast
    import inspect
    import textwrap

    from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider
    from ray.autoscaler._private.loader import load_function_or_class

    from clipdense.jobs.cluster import autoscaler_config, load_local_config
    from clipdense.jobs.fake_nodes import OwnDirFakeNodeProvider, runtime_env_dir_name

    user = load_local_config(ROOT / "cluster" / "local.yaml")
    cfg = autoscaler_config(user, "10.0.0.1:6390")
    assert user["provider"]["type"] == "fake_multinode", "the user's YAML is left as it was"
    assert cfg["provider"]["type"] == "external" and cfg["provider"]["gcs_address"] == "10.0.0.1:6390"
    assert load_function_or_class(cfg["provider"]["module"]) is OwnDirFakeNodeProvider
    assert issubclass(OwnDirFakeNodeProvider, FakeMultiNodeProvider)
    ids = [f"{'f' * 51}{i:05d}" for i in (1, 2)]
    dirs = {runtime_env_dir_name(i) for i in ids}
    assert len(dirs) == 2 and "runtime_resources" not in dirs  # the head's own

    def ray_params_keywords(method) -> set[str]:
        tree = ast.parse(textwrap.dedent(inspect.getsource(method)))
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and ast.unparse(n.func).endswith("RayParams")]
        assert len(calls) == 1
        return {k.arg for k in calls[0].keywords}

    ours = ray_params_keywords(OwnDirFakeNodeProvider._create_node_with_resources_and_labels)
    rays = ray_params_keywords(FakeMultiNodeProvider._create_node_with_resources_and_labels)
    assert ours == rays | {"runtime_env_dir_name"}, "Ray's fake provider changed: update clipdense/jobs/fake_nodes.py"
