"""Faults on the local autoscaling cluster (`clipdense cluster up --local`): nodes that come and go under running
jobs, and a worker node lost while it captions. The tests share one cluster (see cluster_files.py), in this order:
the first starts from the head alone, the second kills a node."""
from __future__ import annotations

import json
import os
import time

import pyarrow.parquet as pq
import pytest
from cluster_files import (
    FAST_NODE_DEATH_ENV,
    ROOT,
    kill_node,
    local_cluster,
    state_api,
    wait_job,
    wait_until,
    worker_nodes,
)
from shard_files import write_shard_set

from clipdense.jobs.submit import SubmitArgs, build_job, main_submit


def _job_results(client, job_id: str) -> list[dict]:
    lines = [ln for ln in client.get_job_logs(job_id).splitlines() if ln.startswith("WDCHECK ")]
    assert lines, f"job {job_id} printed no WDCHECK line:\n{client.get_job_logs(job_id)[-3000:]}"
    return json.loads(lines[-1][len("WDCHECK "):])


@pytest.fixture(scope="module")
def cluster():
    with pytest.MonkeyPatch.context() as mp:
        for k, v in FAST_NODE_DEATH_ENV.items():
            mp.setenv(k, v)
        with local_cluster() as (state, client):
            yield state, client


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_jobs_keep_their_working_dir_while_nodes_come_and_go(cluster, tmp_path):
    """Issue #23 item 0. A long job's actor watches its working_dir while short jobs of the same checkout (so the
    same working_dir package) make the autoscaler add nodes, let them go idle and be removed, and add new ones.
    Every new node sets up that package; none may delete or replace the directory another node's workers run in."""
    _, runtime_env = build_job(SubmitArgs(stage="probe", working_dir=str(ROOT)))  # what `clipdense submit` uploads
    stop = tmp_path / "stop"
    state, client = cluster
    holder = client.submit_job(entrypoint=f"python tests/working_dir_job.py holder {stop}",
                               runtime_env=runtime_env)
    wait_until(lambda: "WDREADY" in client.get_job_logs(holder), 240, "the long job's actor to start")
    rounds: list[set[str]] = []
    for n in range(2):
        job = client.submit_job(entrypoint="python tests/working_dir_job.py short 2", runtime_env=runtime_env)
        status = wait_job(client, job, 240)
        results = _job_results(client, job)
        assert status == "SUCCEEDED", results
        rounds.append({r["node"] for r in results})
        if n == 0:  # idle_timeout_minutes: the short jobs' nodes go, so the next round starts new ones
            wait_until(lambda: len(worker_nodes(state)) <= 1, 180, "idle worker nodes to be removed", poll_s=2)
    stop.touch()
    status = wait_job(client, holder, 120)
    (held,) = _job_results(client, holder)
    assert held["problems"] == [], "\n".join(held["problems"])  # before the fix: cwd vanished, package gone
    assert status == "SUCCEEDED", client.get_job_logs(holder)[-3000:]
    assert held["checks"] > 10
    assert held["node"] not in rounds[0] | rounds[1], "the short jobs ran beside the long one, on other nodes"
    assert rounds[1] - rounds[0], "the second round ran on newly added nodes"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_recaption_survives_losing_a_worker_node(cluster, tmp_path, capsys):
    """Issue #23 item 1. A recaption job (echo engine made slow: 2 s per batch; 2 captioner actors of 1 CPU, so on
    worker nodes) on the local cluster; a few batches in, the node of a captioner actor is killed as
    a lost machine (raylet + workers + agents, SIGKILL). Ray Data restarts the actor on another node and retries
    its batches: the job succeeds with every key exactly once, in input order, and no error rows."""
    expected = write_shard_set(tmp_path / "in", n_shards=6, per_shard=32)
    out = tmp_path / "out"
    state, client = cluster
    auth = ["--address", state.dashboard_url, "--token-file", state.token_path]
    argv = ["recaption", "--config", str(ROOT / "configs/recaption/echo.yaml"), f"input={tmp_path / 'in'}",
            f"output={out}", "engine.concurrency=2", "engine.num_cpus=1", "engine.batch_size=8",
            "engine.num_captions=2", "fault.engine_delay_s=2.0", "decode.size=32", "stats.enabled=false",
            "--no-wait", *auth]
    assert main_submit(argv) == 0, capsys.readouterr().err
    job = capsys.readouterr().out.strip().splitlines()[-1]

    def captioners():
        status = client.get_job_status(job)
        assert not status.is_terminal(), f"job {job} ended before the kill: {status}\n" \
                                         f"{client.get_job_logs(job)[-3000:]}"
        actors = [a for a in state_api(state, "actors") if "MapWorker" in a["class_name"]]
        return actors if len(actors) == 2 and all(a["state"] == "ALIVE" for a in actors) else None

    victim = wait_until(captioners, 300, "both captioner actors to start")[0]["node_id"]
    time.sleep(6)  # a few 2 s batches into captioning (24 batches in all)
    written_before = len([f for f in os.listdir(out) if f.endswith(".parquet")]) if out.is_dir() else 0
    kill_node(state, victim)
    status = wait_job(client, job, 420)
    logs = client.get_job_logs(job)
    assert status == "SUCCEEDED", logs[-3000:]
    assert {n["node_id"]: n["state"] for n in state_api(state, "nodes")}[victim] == "DEAD"
    restarted = [a for a in state_api(state, "actors") if "MapWorker" in a["class_name"]
                 and int(a.get("num_restarts") or 0) > 0]
    assert restarted, "no captioner actor was restarted after its node died"
    assert written_before < len(expected), "the node was killed after the job had written everything"
    outputs = {f: pq.read_table(out / f).to_pylist() for f in sorted(os.listdir(out)) if f.endswith(".parquet")}
    assert sorted(outputs) == sorted(expected)
    for name, keys in expected.items():  # every key exactly once, in its shard's file, in input order
        assert [r["key"] for r in outputs[name]] == keys
    rows = [r for rs in outputs.values() for r in rs]
    assert [r for r in rows if r["error_code"] is not None] == []
    assert all(r["syn_captions"] == [r["caption"]] * 2 for r in rows)
    n = sum(map(len, expected.values()))
    assert f"recaption: {n} rows in, {n} captioned, 0 failed" in logs
