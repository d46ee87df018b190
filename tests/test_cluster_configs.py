"""The shipped cluster files: Ray's validator for launcher YAMLs, KubeRay fields, the Dockerfile, no secrets."""
from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
STAGES = ["recaption", "pretrain", "finetune", "sweep", "demo"]


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _prepared(config: dict) -> dict:
    """What `ray up` validates: the YAML merged with the provider's defaults (ray.autoscaler prepare_config)."""
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(copy.deepcopy(config))


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_cloud_launcher_yaml_passes_rays_validator(name):
    from ray.autoscaler._private.util import validate_config

    config = _load(name)
    validate_config(_prepared(config))
    # Every top-level key is ours: no provider default (e.g. a nightly-wheel `pip install`) leaks in.
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands", "head_start_ray_commands",
                "worker_start_ray_commands", "file_mounts", "docker"):
        assert key in config, f"{name}: {key} not set, Ray's default would be used"


def test_local_yaml_passes_validator_verbatim():
    """The autoscaler reads the fake_multinode file as is (no defaults merged): it must validate without help."""
    from ray.autoscaler._private.util import validate_config

    from clipdense.jobs.cluster import load_local_config

    config = _load("local.yaml")
    validate_config(config)
    assert load_local_config(CLUSTER / "local.yaml") == config
    assert config["provider"]["type"] == "fake_multinode"
    assert config["head_node_type"] == "ray.head.default"
    assert 0 < config["idle_timeout_minutes"] < 1
    assert config["available_node_types"]["ray.head.default"]["resources"].get("CPU", 0) == 0
    workers = {k: v for k, v in config["available_node_types"].items() if k != "ray.head.default"}
    assert workers and all(1 <= v["max_workers"] <= 3 and v.get("min_workers", 0) == 0 for v in workers.values())


def test_local_yaml_with_bad_key_is_one_line_error(tmp_path):
    from clipdense.config import UserError
    from clipdense.jobs.cluster import load_local_config

    config = _load("local.yaml")
    config["idle_timeout_minutes"] = -1
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    with pytest.raises(UserError) as e:
        load_local_config(bad)
    assert "bad.yaml" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_cloud_node_types_and_safe_defaults(name):
    config = _load(name)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    workers = {k: v for k, v in types.items() if v is not head}
    gpu = {k: v for k, v in workers.items() if v["resources"].get("GPU", 0) > 0}
    cpu = {k: v for k, v in workers.items() if v["resources"].get("GPU", 0) == 0}
    assert any("recaption" in k for k in gpu) and any("pretrain" in k for k in gpu) and cpu
    assert any("spot" in k for k in gpu), "a spot/preemptible GPU node type"
    assert all(v["min_workers"] == 0 < v["max_workers"] for v in workers.values())
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    text = "\n".join(starts)
    assert "0.0.0.0" not in text, "the dashboard must not listen on every interface"
    assert text.count("RAY_AUTH_MODE=token") == 2
    assert any("RAY_AUTH_MODE=token" in o for o in config["docker"]["run_options"])
    assert "~/.ray/auth_token" in config["file_mounts"]
    extra_rules = config["provider"].get("security_group", {}).get("IpPermissions", [])
    assert not any(r.get("FromPort") in (6379, 8265, 10001) for r in extra_rules)


def _kuberay_docs() -> dict[str, dict]:
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted((CLUSTER / "kuberay").glob("*.yaml"))}


def _check_cluster_spec(spec: dict, where: str) -> None:
    assert spec["enableInTreeAutoscaling"] is True, where
    assert spec["authOptions"]["mode"] == "token", where
    assert str(spec["rayVersion"]).startswith("2.60"), where
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{where}: head service must stay internal"
    assert head["template"]["spec"]["containers"][0]["image"]
    assert spec["workerGroupSpecs"], where
    for g in spec["workerGroupSpecs"]:
        for key in ("groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"):
            assert key in g, f"{where}: worker group without {key}"
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], f"{where}/{g['groupName']}"
        assert all(isinstance(v, str) for v in g["rayStartParams"].values()), "rayStartParams values are strings"
        container = g["template"]["spec"]["containers"][0]
        assert {"requests", "limits"} <= set(container["resources"]), f"{where}/{g['groupName']}"
        if g["groupName"].startswith("gpu"):
            assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1, f"{where}/{g['groupName']}"


def test_kuberay_raycluster_fields():
    doc = _kuberay_docs()["raycluster.yaml"]
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    _check_cluster_spec(doc["spec"], "raycluster.yaml")
    groups = {g["groupName"] for g in doc["spec"]["workerGroupSpecs"]}
    assert {"cpu-data", "gpu-recaption", "gpu-pretrain"} <= groups


@pytest.mark.parametrize("stage", STAGES)
def test_kuberay_rayjob_per_stage(stage):
    """Each stage has a RayJob (made from a jobs/*.yaml spec: tests/test_jobs_specs.py checks they agree)."""
    docs = {name: doc for name, doc in _kuberay_docs().items()
            if name.startswith("rayjob-") and doc["metadata"]["labels"]["clipdense/stage"] == stage}
    assert docs, f"no cluster/kuberay/rayjob-*.yaml runs {stage}"
    for name, doc in docs.items():
        assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
        spec = doc["spec"]
        assert spec["entrypoint"].startswith(f"python -m clipdense.jobs.entry {stage} ")
        assert spec["shutdownAfterJobFinishes"] is True
        yaml.safe_load(spec.get("runtimeEnvYAML", "{}"))
        _check_cluster_spec(spec["rayClusterSpec"], name)


def test_dockerfile_base_image_and_install():
    text = (CLUSTER / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert froms and re.fullmatch(r"rayproject/ray:2\.60\.\d+-py311-cu12\d", froms[0]), froms
    assert re.search(r"pip install[^\n]*\"\.\$\{EXTRAS\}\"", text)
    for d in ("clipdense", "configs"):
        assert re.search(rf"^COPY\b.*\b{d}\b", text, re.M), f"Dockerfile does not copy {d}/"


def test_one_job_entry_point_serves_every_stage():
    from clipdense.cli import STAGES
    from clipdense.jobs import JOB_STAGES

    assert set(JOB_STAGES) - {"probe"} <= set(STAGES)
    entry = [sys.executable, "-m", "clipdense.jobs.entry"]
    r = subprocess.run([*entry, "finetune", "--print-config", "ray.in_process=true"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "in_process: true" in r.stdout, r.stderr[-2000:]
    r = subprocess.run([*entry, "train"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "unknown stage 'train'" in r.stderr


SECRET_PATTERNS = {
    "AWS access key id": r"\b(AKIA|ASIA)[0-9A-Z]{16}\b",
    "AWS secret key": r"(?i)aws_secret_access_key\s*[:=]\s*\S{20,}",
    "account id / ARN": r"arn:aws[a-z-]*:[a-z0-9-]*:[a-z0-9-]*:\d{12}|\b\d{12}\b",
    "private key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----|\"private_key\"\s*:",
    "GCP service account": r"[a-z0-9-]+@[a-z0-9-]+\.iam\.gserviceaccount\.com",
    "bearer / auth token": r"(?i)(bearer\s+[A-Za-z0-9._-]{20,}|auth_token\s*[:=]\s*['\"]?[A-Fa-f0-9]{32,})",
}


def test_no_file_contains_something_like_a_secret():
    files = [p for p in CLUSTER.rglob("*") if p.is_file()]
    files += list((ROOT / "clipdense" / "jobs").glob("*.py"))
    assert len(files) >= 12
    for path in files:
        text = path.read_text()
        for what, pattern in SECRET_PATTERNS.items():
            m = re.search(pattern, text)
            assert m is None, f"{path.relative_to(ROOT)}: looks like a {what}: {m.group(0)[:40]!r}"


def test_secret_scan_catches_planted_secrets():
    planted = ["AKIAABCDEFGHIJKLMNOP", "arn:aws:iam::123456789012:role/x", "-----BEGIN RSA PRIVATE KEY-----",
               "auth_token: " + "ab" * 20]
    for text in planted:
        assert any(re.search(p, text) for p in SECRET_PATTERNS.values()), text
