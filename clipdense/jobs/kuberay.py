"""KubeRay `RayJob` manifests from job specs, so the cluster files cannot drift from jobs/.

`clipdense submit jobs/NAME.yaml [key=value ...] --kuberay` prints one. `python -m clipdense.jobs.kuberay` writes
cluster/kuberay/rayjob-NAME.yaml for every spec in jobs/ with a `kuberay:` section (and removes the ones no spec
makes any more); `--check` only compares, exit 1 on a difference. The RayJob's cluster is the head and the named
worker groups of cluster/kuberay/raycluster.yaml (their maxReplicas set by the spec); the job runs the same
`python -m clipdense.jobs.entry STAGE` command as `clipdense submit`, with the config read from the image.
"""
from __future__ import annotations

import argparse
import copy
import re
import sys
import textwrap
from pathlib import Path

import yaml

from clipdense.config import ConfigError, read_yaml
from clipdense.jobs.build import BASE_ENV_VARS, entry_command, find_project_root
from clipdense.jobs.spec import IMAGE_ROOT, JobSpec, check_stage_config, load_spec

RAYCLUSTER = "cluster/kuberay/raycluster.yaml"
MANIFESTS = "cluster/kuberay"
DEFAULT_IMAGE = "${CLIPDENSE_IMAGE}"
K8S_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
GENERATED = "RayJob made from {spec} by `python -m clipdense.jobs.kuberay`: edit the spec, not this file."


def _image(spec: JobSpec) -> str:
    return spec.kuberay.image or spec.runtime_env.image_uri or DEFAULT_IMAGE


def _cluster_spec(spec: JobSpec, root: Path) -> dict:
    """raycluster.yaml's cluster with only the spec's worker groups (maxReplicas from the spec) and its image."""
    cluster = copy.deepcopy(read_yaml(root / RAYCLUSTER)["spec"])
    groups = {g["groupName"]: g for g in cluster.pop("workerGroupSpecs")}
    cluster["workerGroupSpecs"] = []
    for name, max_replicas in spec.kuberay.worker_groups.items():
        if name not in groups:
            raise ConfigError(f"{spec.source}: key 'kuberay.worker_groups.{name}': no such group in {RAYCLUSTER} "
                              f"({', '.join(groups)})")
        group = groups[name]
        group.update(maxReplicas=max_replicas, minReplicas=min(group["minReplicas"], max_replicas),
                     replicas=min(group["replicas"], max_replicas))
        cluster["workerGroupSpecs"].append(group)
    for pod in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        for container in pod["template"]["spec"]["containers"]:
            container["image"] = _image(spec)
    return cluster


def _job_spec(spec: JobSpec, extra: list[str] | tuple[str, ...]) -> dict:
    args = ["--config", f"{IMAGE_ROOT}/configs/{spec.config}"] if spec.config else []
    runtime_env: dict = {"env_vars": {**BASE_ENV_VARS, **spec.runtime_env.env_vars}}
    if spec.runtime_env.pip:
        runtime_env["pip"] = list(spec.runtime_env.pip)
    job = {"entrypoint": entry_command(spec.stage, [*args, *spec.override_args(extra)]),
           "runtimeEnvYAML": yaml.safe_dump(runtime_env, sort_keys=True),
           "metadata": {"clipdense_stage": spec.stage, "clipdense_job": spec.name, **spec.metadata}}
    if spec.entrypoint_num_cpus:
        job["entrypointNumCpus"] = spec.entrypoint_num_cpus
    if spec.entrypoint_num_gpus:
        job["entrypointNumGpus"] = spec.entrypoint_num_gpus
    job.update(submissionMode="K8sJobMode", shutdownAfterJobFinishes=True, ttlSecondsAfterFinished=600,
               backoffLimit=0)
    return job


def rayjob(spec: JobSpec, extra: list[str] | tuple[str, ...] = (), root: Path | None = None) -> dict:
    """The RayJob for the spec (plus command-line overrides), its stage config checked first."""
    if spec.kuberay is None:
        raise ConfigError(f"{spec.source}: no 'kuberay' section (its worker groups), so no RayJob: add one")
    if not K8S_NAME.fullmatch(f"clipdense-{spec.name}") or len(spec.name) > 50:
        raise ConfigError(f"{spec.source}: the file name names the RayJob: lowercase letters, digits and '-' only")
    check_stage_config(spec, extra)
    job = _job_spec(spec, extra)
    job["rayClusterSpec"] = _cluster_spec(spec, root or find_project_root())
    return {"apiVersion": "ray.io/v1", "kind": "RayJob",
            "metadata": {"name": f"clipdense-{spec.name}",
                         "labels": {"app.kubernetes.io/name": "clipdense", "clipdense/stage": spec.stage,
                                    "clipdense/job": spec.name}},
            "spec": job}


def _header(spec: JobSpec, source: str) -> list[str]:
    name, image = spec.name, _image(spec)
    variables = re.findall(r"\$\{(\w+)\}", image)
    lines = [GENERATED.format(spec=source), *textwrap.wrap(spec.description, 116),
             "KubeRay creates a cluster from rayClusterSpec, runs the entrypoint, and deletes the cluster when the "
             "job ends:"]
    apply = f"cluster/kuberay/rayjob-{name}.yaml"
    if variables:
        lines += [f"  export {v}=<registry>/<image>:<tag>   # built from cluster/Dockerfile" + (
            " with --build-arg EXTRAS=[vllm]" if "VLLM" in v else "") for v in variables]
        subst = " ".join(f"${v}" for v in variables)
        lines.append(f"  envsubst '{subst}' < {apply} | kubectl apply -f -")
    else:
        lines.append(f"  kubectl apply -f {apply}")
    lines += [f"  kubectl logs -f job/clipdense-{name}   # the submitter's log = the job's log",
              "The config is read from the image; outputs go where the spec's overrides say (shared storage). "
              "Token auth is on."]
    if spec.entrypoint_memory:
        lines.append(f"entrypoint_memory ({spec.entrypoint_memory / 2 ** 30:g} GiB) has no RayJob field: KubeRay "
                     "does not reserve it (`clipdense submit` does).")
    return ["# " + ln for ln in lines]


def rayjob_yaml(spec: JobSpec, extra: list[str] | tuple[str, ...] = (), root: Path | None = None) -> str:
    """The manifest as text: a comment header saying how to apply it, then the RayJob."""
    root = root or find_project_root()
    source = spec.source
    if Path(source).is_absolute() and Path(source).is_relative_to(root):
        source = Path(source).relative_to(root).as_posix()
    body = yaml.safe_dump(rayjob(spec, extra, root), sort_keys=False, width=4096)
    return "\n".join(_header(spec, source)) + "\n" + body


def expected_manifests(root: Path) -> dict[Path, str]:
    """cluster/kuberay/rayjob-NAME.yaml -> its text, for every spec in jobs/ with a kuberay section."""
    out = {}
    for path in sorted((root / "jobs").glob("*.yaml")):
        spec = load_spec(path)
        if spec.kuberay is not None:
            out[root / MANIFESTS / f"rayjob-{spec.name}.yaml"] = rayjob_yaml(spec, root=root)
    return out


def sync_manifests(root: Path, check: bool) -> list[str]:
    """Write (or, with check, compare) the generated manifests; returns what differed, was stale or missing."""
    expected = expected_manifests(root)
    stale = [p for p in (root / MANIFESTS).glob("rayjob-*.yaml") if p not in expected]
    changed = [p for p, text in expected.items() if not p.is_file() or p.read_text() != text]
    if not check:
        for p in changed:
            p.write_text(expected[p])
        for p in stale:
            p.unlink()
    return [f"{p.relative_to(root)} ({'stale' if p in stale else 'differs'})" for p in changed + stale]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clipdense.jobs.kuberay", description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="compare only; exit 1 if a manifest is not what its spec "
                   "makes")
    args = p.parse_args(argv)
    root = find_project_root()
    try:
        diffs = sync_manifests(root, args.check)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for d in diffs:
        print(("out of date: " if args.check else "updated: ") + d)
    return 1 if args.check and diffs else 0


if __name__ == "__main__":
    sys.exit(main())
