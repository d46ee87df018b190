"""clipdense.ray_session on a real local Ray: a run starts Ray and stops it again, joins a running cluster and leaves
it running, reuses a Ray already in the process; DataContext settings are scoped; old Ray keys fail with a hint.

Starting and joining happen in child processes: this test process already runs the session's Ray (`ray_local`),
which `ray_session` would reuse."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from clipdense.config import ConfigError, RayConfig, build_config
from clipdense.ray_session import data_context, ray_session


def _child(code: str, **env: str):
    """Run `code` in a fresh Python (no Ray yet, no RAY_ADDRESS unless given); its last stdout line, as JSON."""
    full = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **env}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=full)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


START = """
import json, pathlib, ray
from clipdense.config import RayConfig
from clipdense.ray_session import ray_session

def running(pid):  # not gone, not a zombie
    stat = pathlib.Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"

with ray_session(RayConfig(num_cpus=2)) as started:
    cpus = ray.cluster_resources()["CPU"]
    pids = [p.process.pid for procs in ray._private.worker._global_node.all_processes.values() for p in procs]
    before = [p for p in pids if running(p)]
print(json.dumps({"started": started, "cpus": cpus, "running": len(before), "after": ray.is_initialized(),
                  "alive": [p for p in pids if running(p)]}))
"""

JOIN = """
import json, os, ray
from clipdense.config import RayConfig
from clipdense.ray_session import ray_session
out = []
for cfg, env in ((RayConfig(address=os.environ["GCS"], num_cpus=1), None), (RayConfig(num_cpus=1), os.environ["GCS"])):
    if env:
        os.environ["RAY_ADDRESS"] = env
    with ray_session(cfg) as connected:
        out.append({"connected": connected, "cpus": ray.cluster_resources()["CPU"],
                    "gcs": ray.get_runtime_context().gcs_address})
    out[-1]["after"] = ray.is_initialized()
print(json.dumps(out))
"""


def test_a_run_starts_a_local_ray_and_shuts_it_down():
    r = _child(START)
    assert r["started"] is True and r["cpus"] == 2          # num_cpus applies to the Ray it starts
    assert r["after"] is False and r["running"] >= 2          # gcs_server, raylet, ... while inside
    assert r["alive"] == [], "processes of the Ray it started are still running"


def test_a_run_joins_a_running_cluster_and_leaves_it_running(ray_local):
    ray = ray_local
    gcs, cpus = ray.get_runtime_context().gcs_address, ray.cluster_resources()["CPU"]
    joined = _child(JOIN, GCS=gcs)
    # by address, then through $RAY_ADDRESS (as inside a Ray job): the running cluster, not a new one with 1 CPU
    assert [(j["connected"], j["cpus"], j["gcs"], j["after"]) for j in joined] == [(True, cpus, gcs, False)] * 2
    # the cluster still serves this process after the child's sessions closed
    assert ray.is_initialized() and ray.cluster_resources()["CPU"] == cpus
    assert ray.get(ray.remote(lambda: 41 + 1).remote()) == 42


def test_a_ray_already_in_the_process_is_reused_and_left_running(ray_local):
    with ray_session(RayConfig(num_cpus=1)) as connected:
        assert connected is False
    assert ray_local.is_initialized() and ray_local.get(ray_local.put(7)) == 7


def test_a_dashboard_url_in_ray_address_is_not_a_cluster_to_join(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")    # what `clipdense submit` reads
    assert RayConfig().target() is None
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert RayConfig().target() == "10.0.0.1:6379" and RayConfig(address="auto").target() == "auto"
    monkeypatch.delenv("RAY_ADDRESS")
    assert RayConfig().target() is None


def test_data_context_settings_are_scoped(ray_local):
    from ray.data import DataContext

    ctx = DataContext.get_current()
    before = ctx.execution_options.preserve_order, ctx.read_op_min_num_blocks
    settings = {"execution_options.preserve_order": not before[0], "read_op_min_num_blocks": before[1] + 3}
    with data_context(settings):
        assert (ctx.execution_options.preserve_order, ctx.read_op_min_num_blocks) == (not before[0], before[1] + 3)
        ds = ray_local.data.range(4)
    assert (ctx.execution_options.preserve_order, ctx.read_op_min_num_blocks) == before
    assert ds.context.execution_options.preserve_order is (not before[0])   # a dataset made inside keeps them
    with pytest.raises(RuntimeError), data_context(settings):
        raise RuntimeError("boom")
    assert (ctx.execution_options.preserve_order, ctx.read_op_min_num_blocks) == before


@pytest.mark.parametrize("stage,data,needle", [
    ("pretrain", {"ray": "off"}, "`ray: off` becomes `ray: {in_process: true}`"),
    # keys of 0.0.x (ray_address, runner, ray_num_cpus) are unknown keys now (CHANGELOG 0.1.0)
    ("pretrain", {"ray_address": "auto"}, "unknown key 'ray_address'"),
    ("finetune", {"runner": "local"}, "unknown key 'runner'"),
    ("demo", {"ray_num_cpus": 4}, "unknown key 'ray_num_cpus'"),
    ("demo", {"ray": {"in_process": True}}, "this stage always runs on Ray"),
    ("recaption", {"input": "x", "output": "y", "ray": {"in_process": True}, "engine": {"concurrency": 2}},
     "ray.in_process runs one captioner in this process: engine.concurrency must be 1"),
])
def test_ray_section_mistakes_fail_with_one_line(stage, data, needle):
    import importlib

    from clipdense.cli import STAGES

    module, cls = STAGES[stage]
    with pytest.raises(ConfigError) as e:
        build_config(getattr(importlib.import_module(module), cls), data, f"{stage}.yaml")
    assert needle in str(e.value) and str(e.value).startswith(f"{stage}.yaml: ") and "\n" not in str(e.value)


def test_the_cli_sets_the_process_env_before_torch_and_a_user_value_wins(tmp_path):
    """ray_session.PROCESS_ENV reaches the CLI's process before torch loads (torch reads THP_MEM_ALLOC_ENABLE at its
    first allocation) and is inherited by what it starts; a value the user set is kept."""
    from clipdense.config import PROCESS_ENV

    probe = ("import contextlib, io, os, sys; from clipdense import cli\n"
             "with contextlib.redirect_stdout(io.StringIO()): cli.main(['--help'])\n"
             "print('torch' in sys.modules, os.environ.get('THP_MEM_ALLOC_ENABLE'))")
    env = {k: v for k, v in os.environ.items() if k not in PROCESS_ENV}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "1"]
    env["THP_MEM_ALLOC_ENABLE"] = "0"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "0"]
