"""Job specs (jobs/*.yaml): each validates (stage, config + overrides, runtime_env and resources as Ray checks them),
a bad one is one line naming file and key, `--print` is a `ray job submit` command Ray's own CLI parses to the same
job, `--kuberay` is the committed manifest, and the smallest spec runs on the local autoscaling cluster."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from cluster_files import local_cluster, state_api
from ray.dashboard.modules.job.cli import submit as ray_job_submit
from ray.dashboard.modules.job.common import JobSubmitRequest
from ray.runtime_env import RuntimeEnv
from shard_files import write_shard_set

from clipdense.config import ConfigError
from clipdense.jobs import JOB_STAGES, client
from clipdense.jobs.build import SubmitArgs
from clipdense.jobs.kuberay import RAYCLUSTER, rayjob, sync_manifests
from clipdense.jobs.spec import check_stage_config, check_with_ray, load_spec, prepare_job
from clipdense.jobs.submit import main_submit

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "jobs").glob("*.yaml"))
SMALLEST = ROOT / "jobs" / "recaption-tiny-cpu.yaml"
COST = re.compile(r"\b(GPU-|CPU-)?(hours?|seconds?|min|minutes?)\b")


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    """No Ray token anywhere, so `--print` adds no auth prefix."""
    monkeypatch.setattr(client, "DEFAULT_TOKEN_PATH", tmp_path / "no-token")
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)


def _ids(paths):
    return [p.stem for p in paths]


def test_jobs_holds_a_spec_per_typical_job():
    configs = {p.stem: check_stage_config(load_spec(p)) for p in SPECS}
    assert len(configs) >= 5
    recaption = configs["recaption-vllm-datacomp"]
    assert recaption.engine.kind == "vllm" and recaption.engine.num_gpus == 1
    pretrain = configs["pretrain-vitb16-datacompdr"]
    assert pretrain.model.name == "ViT-B-16" and pretrain.loss.distill.enabled
    assert pretrain.data.recaptions.startswith("s3://") and "datacompdr" in pretrain.data.recaptions
    finetune = configs["finetune-ade20k"]
    assert finetune.task == "seg" and finetune.data.num_classes == 150
    sweep = configs["sweep-data-efficiency"]
    assert sweep.min_fraction < 1 and {t.name for t in sweep.tasks} == {"seg", "depth", "det"}
    assert configs["demo-quick"].quick is True
    assert configs["recaption-tiny-cpu"].engine.kind == "echo"


@pytest.mark.parametrize("path", SPECS, ids=_ids(SPECS))
def test_every_spec_validates(path, no_token):
    spec = load_spec(path)
    assert spec.stage in JOB_STAGES
    assert check_stage_config(spec) is not None, "the stage's config class was not built"
    assert COST.search(spec.description), f"{path.name}: the description should say what the job costs"
    a, entrypoint, runtime_env = prepare_job(spec)
    assert shlex.split(entrypoint)[:5] == ["python", "-m", "clipdense.jobs.entry", spec.stage, "--config"]
    # Ray's own classes, offline: the runtime_env keys it knows and the request it accepts
    assert set(runtime_env) <= set(RuntimeEnv.known_fields)
    RuntimeEnv(**runtime_env)
    JobSubmitRequest(entrypoint=entrypoint, runtime_env=runtime_env, metadata=a.job_metadata(), **a.resources)
    assert a.job_metadata()["clipdense_job"] == path.stem


def _gpus(group: dict) -> int:
    return int(group["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))


def _cpus(group: dict) -> float:
    return float(group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])


@pytest.mark.parametrize("path", [p for p in SPECS if load_spec(p).kuberay], ids=_ids(
    [p for p in SPECS if load_spec(p).kuberay]))
def test_kuberay_cluster_fits_the_job(path):
    """The RayJob's groups can hold the driver's reserved CPUs and every GPU the stage's training asks for."""
    spec = load_spec(path)
    groups = rayjob(spec, root=ROOT)["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert max(_cpus(g) for g in groups) >= spec.entrypoint_num_cpus
    cfg = check_stage_config(spec)
    scaling = getattr(getattr(cfg, "train", None), "scaling", None)
    if scaling is not None and scaling.use_gpu:
        assert sum(_gpus(g) * g["maxReplicas"] for g in groups) >= scaling.num_workers * scaling.gpus_per_worker


def test_committed_manifests_are_what_the_specs_make():
    """Regenerating cluster/kuberay/rayjob-*.yaml from jobs/ changes nothing and leaves no stale file."""
    assert sync_manifests(ROOT, check=True) == []
    made = sorted(p.name for p in (ROOT / "cluster" / "kuberay").glob("rayjob-*.yaml"))
    assert made == sorted(f"rayjob-{p.stem}.yaml" for p in SPECS if load_spec(p).kuberay)


def test_kuberay_flag_prints_the_committed_manifest_plus_overrides(capsys):
    path = ROOT / "jobs" / "finetune-ade20k.yaml"
    committed = (ROOT / "cluster" / "kuberay" / "rayjob-finetune-ade20k.yaml").read_text()
    assert main_submit([str(path), "--kuberay"]) == 0
    assert capsys.readouterr().out == committed
    assert main_submit([str(path), "train.log_every=10", "--kuberay"]) == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    assert doc["kind"] == "RayJob" and doc["metadata"]["name"] == "clipdense-finetune-ade20k"
    args = shlex.split(doc["spec"]["entrypoint"])
    assert args[3:6] == ["finetune", "--config", "/home/ray/clipdense/configs/finetune/ade20k-upernet-vitb16.yaml"]
    assert args[-1] == "train.log_every=10"
    assert doc["spec"]["entrypointNumCpus"] == 1
    groups = [g["groupName"] for g in doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]]
    assert groups == ["gpu-pretrain"]
    cluster = yaml.safe_load((ROOT / RAYCLUSTER).read_text())["spec"]
    assert doc["spec"]["rayClusterSpec"]["headGroupSpec"] == cluster["headGroupSpec"]


def test_print_is_a_ray_job_submit_command_for_the_same_job(capsys, no_token):
    """Ray's own CLI parses the printed command back into the entrypoint, runtime_env, resources and metadata."""
    path = ROOT / "jobs" / "pretrain-vitb16-datacompdr.yaml"
    argv = [str(path), "train.log_every=10", "--address", "http://10.0.0.1:8265", "--job-id", "pre-1", "--print"]
    assert main_submit(argv) == 0
    printed = shlex.split(capsys.readouterr().out)
    assert printed[:3] == ["ray", "job", "submit"]
    params = ray_job_submit.make_context("submit", printed[3:]).params
    a, entrypoint, runtime_env = prepare_job(load_spec(path), ["train.log_every=10"])
    assert shlex.join(params["entrypoint"]) == entrypoint  # what `ray job submit` sends on Linux
    assert params["entrypoint"][-1] == "train.log_every=10"
    assert "data.shards=s3://my-bucket/datacomp-12m/{00000000..00001199}.tar" in params["entrypoint"]
    assert json.loads(params["runtime_env_json"]) == runtime_env
    assert json.loads(params["metadata_json"]) == {"clipdense_stage": "pretrain",
                                                   "clipdense_job": "pretrain-vitb16-datacompdr",
                                                   "pipeline": "clipdense", "step": "pretrain"}
    assert (params["entrypoint_num_cpus"], params["entrypoint_memory"]) == (2, 16 * 2 ** 30)
    assert params["entrypoint_num_gpus"] is None
    assert (params["address"], params["submission_id"]) == ("http://10.0.0.1:8265", "pre-1")


def test_print_names_the_token_for_rays_cli_and_works_for_a_stage(capsys, no_token, tmp_path):
    token = tmp_path / "tok"
    token.write_text("secret-token")
    assert main_submit(["probe", "nodes=2", "--token-file", str(token), "--print"]) == 0
    out = capsys.readouterr().out
    assert "secret-token" not in out
    assert shlex.split(out)[:6] == ["env", "RAY_AUTH_MODE=token", f"RAY_AUTH_TOKEN_PATH={token}", "ray", "job",
                                    "submit"]
    assert shlex.split(out)[-2:] == ["probe", "nodes=2"]


GOOD = "description: a test job, seconds\nstage: recaption\nconfig: echo\noverrides: {input: a, output: b}\n"


@pytest.mark.parametrize("text,key", [
    (GOOD + "foo: 1\n", "unknown key 'foo'"),
    (GOOD + "runtime_env: {conda: x}\n", "unknown key 'runtime_env.conda'"),
    (GOOD + "runtime_env: {env_vars: {N: 1}}\n", "'runtime_env.env_vars.N'"),
    (GOOD + "runtime_env: {image_uri: img, pip: [x]}\n", "'runtime_env'"),
    (GOOD.replace("recaption", "train"), "key 'stage'"),
    (GOOD.replace("config: echo", "config: nope"), "key 'config'"),
    (GOOD.replace("output: b", "output: b, engine.nope: 1"), "'engine.nope'"),
    (GOOD.replace("output: b", "output: b, engine.batch_size: many"), "'engine.batch_size'"),
    (GOOD + "entrypoint_num_cpus: -1\n", "key 'entrypoint_num_cpus'"),
    (GOOD + "entrypoint_memory: lots\n", "key 'entrypoint_memory'"),
    (GOOD.replace("a test job, seconds", "|\n  two\n  lines"), "key 'description'"),
    (GOOD + "kuberay: {worker_groups: {gpu-nope: 1}}\n", "'kuberay.worker_groups.gpu-nope'"),
    (GOOD + "kuberay: {worker_groups: {cpu-data: 0}}\n", "'kuberay.worker_groups.cpu-data'"),
    (GOOD + "stage: [\n", "invalid YAML"),
])
def test_bad_spec_is_one_line_naming_file_and_key(text, key, tmp_path, capsys):
    path = tmp_path / "bad-job.yaml"
    path.write_text(text)
    flag = "--kuberay" if "kuberay" in text else "--print"
    assert main_submit([str(path), flag]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and key in err, err


def test_ray_refusals_are_one_line_naming_file_and_key():
    spec = load_spec(SMALLEST)
    a = SubmitArgs(stage="recaption", resources=spec.resources())
    cases = [({"env_vars": {"N": 1}}, a, "key 'runtime_env'"),
             ({"conda_env": "x"}, a, "'conda_env' is not a runtime_env key"),
             ({}, SubmitArgs(stage="recaption", resources={**spec.resources(), "entrypoint_memory": 1.5}),
              "entrypoint_memory must be an integer")]
    for runtime_env, args, needle in cases:
        with pytest.raises(ConfigError) as e:
            check_with_ray(spec, "python -m x", runtime_env, args)
        assert str(SMALLEST) in str(e.value) and needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("argv,needle", [
    (["jobs/recaption-tiny-cpu.yaml", "--kuberay"], "no 'kuberay' section"),
    (["jobs/recaption-tiny-cpu.yaml", "--pip", "einops", "--print"], "--pip comes from the job spec"),
    (["jobs/missing.yaml", "--print"], "config file not found: jobs/missing.yaml"),
    (["probe", "--kuberay"], "--kuberay renders a job spec"),
])
def test_submit_spec_user_mistakes(argv, needle, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main_submit(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_smallest_spec_runs_on_the_local_cluster(tmp_path, capsys):
    """`clipdense submit jobs/recaption-tiny-cpu.yaml input=... output=...` on a fresh local autoscaling cluster:
    the autoscaler adds a worker node for the captioner, the job succeeds, every key is captioned once."""
    keys = write_shard_set(tmp_path / "in", n_shards=2, per_shard=16, digits=5)
    out = tmp_path / "out"
    with local_cluster() as (state, job_client):
        argv = [str(SMALLEST), f"input={tmp_path / 'in'}", f"output={out}", "--address", state.dashboard_url,
                "--token-file", state.token_path]
        rc = main_submit(argv)  # waits for the job
        job_id = capsys.readouterr().out.strip().splitlines()[0]
        logs = job_client.get_job_logs(job_id)
        assert rc == 0, logs[-3000:]
        assert job_client.get_job_info(job_id).metadata["clipdense_job"] == "recaption-tiny-cpu"
        assert [n for n in state_api(state, "nodes") if not n["is_head_node"]], "no worker node was added"
    assert sorted(p.name for p in out.glob("*.parquet")) == sorted(keys)
    for name, expected in keys.items():
        rows = pq.read_table(out / name).to_pylist()
        assert [r["key"] for r in rows] == expected
        assert all(r["syn_captions"] == [r["caption"]] * 2 for r in rows)
    assert "recaption: 32 rows in, 32 captioned, 0 failed" in logs
