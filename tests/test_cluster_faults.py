"""Faults on the local autoscaling cluster (`clipdense cluster up --local`): nodes that come and go under running
jobs, and a worker node lost while it captions. Each test starts its own cluster (see cluster_files.py)."""
from __future__ import annotations

import json

import pytest
from cluster_files import ROOT, local_cluster, wait_job, wait_until, worker_nodes

from clipdense.jobs.submit import SubmitArgs, build_job


def _job_results(client, job_id: str) -> list[dict]:
    lines = [ln for ln in client.get_job_logs(job_id).splitlines() if ln.startswith("WDCHECK ")]
    assert lines, f"job {job_id} printed no WDCHECK line:\n{client.get_job_logs(job_id)[-3000:]}"
    return json.loads(lines[-1][len("WDCHECK "):])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_jobs_keep_their_working_dir_while_nodes_come_and_go(tmp_path):
    """Issue #23 item 0. A long job's actor watches its working_dir while short jobs of the same checkout (so the
    same working_dir package) make the autoscaler add nodes, let them go idle and be removed, and add new ones.
    Every new node sets up that package; none may delete or replace the directory another node's workers run in."""
    _, runtime_env = build_job(SubmitArgs(stage="probe", working_dir=str(ROOT)))  # what `clipdense submit` uploads
    stop = tmp_path / "stop"
    with local_cluster() as (state, client):
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
        assert held["problems"] == [] and status == "SUCCEEDED", held
        assert held["checks"] > 10
        assert held["node"] not in rounds[0] | rounds[1], "the short jobs ran beside the long one, on other nodes"
        assert rounds[1] - rounds[0], "the second round ran on newly added nodes"
