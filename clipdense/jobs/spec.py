"""Job specs: `jobs/NAME.yaml`, one ready-to-submit Ray job each.

    description: one line: what the job does and what it costs
    stage: recaption                          # one of clipdense.jobs.JOB_STAGES
    config: qwen2.5vl-7b-vllm                 # shipped: NAME (configs/STAGE/NAME.yaml) or a path under configs/
    overrides: {input: s3://..., engine.concurrency: [1, 8]}   # dotted stage-config keys (`key=value` on the CLI)
    runtime_env: {working_dir: ., pip: [...], env_vars: {...}}  # Ray's keys; or image_uri: IMG instead of the checkout
    entrypoint_num_cpus: 2                    # reserved for the job's driver, in Ray's names; memory: bytes or 8GiB
    entrypoint_num_gpus: 0
    entrypoint_memory: 8GiB
    metadata: {owner: vision}
    kuberay: {image: ..., worker_groups: {cpu-data: 4}}   # the RayJob's cluster: groups of raycluster.yaml -> max

`clipdense submit jobs/NAME.yaml [key=value ...] --address URL` submits one through `clipdense.jobs.build` (the same
entrypoint, runtime_env and token auth as `clipdense submit STAGE`); any mistake is one ConfigError line naming the
spec file and the key.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, PrivateAttr, ValidationInfo, field_validator, model_validator
from ray._common.ray_option_utils import validate_actor_options
from ray.dashboard.modules.job.common import JobSubmitRequest
from ray.runtime_env import RuntimeEnv

from clipdense.config import (
    Config,
    ConfigError,
    UserError,
    apply_override,
    build_config,
    configs_dir,
    get_dotted,
    read_yaml,
)
from clipdense.jobs import JOB_STAGES
from clipdense.jobs.build import SubmitArgs, build_job, find_project_root, validate_stage_config

IMAGE_ROOT = "/home/ray/clipdense"   # the checkout inside cluster/Dockerfile's image (its WORKDIR)
SIZE_UNITS = {"B": 1, "KiB": 2 ** 10, "MiB": 2 ** 20, "GiB": 2 ** 30, "TiB": 2 ** 40}
# the option of Ray's job supervisor actor that each entrypoint resource becomes (Ray's JobManager)
ACTOR_OPTIONS = {"entrypoint_num_cpus": "num_cpus", "entrypoint_num_gpus": "num_gpus", "entrypoint_memory": "memory"}
KEY_RE = re.compile(r"[\w-]+(\.[\w-]+)*")


def parse_size(value: Any) -> Any:
    """`8GiB`, `512MiB`, or a number of bytes."""
    if not isinstance(value, str):
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]iB|B)?\s*", value)
    if not m:
        raise ValueError(f"{value!r} is not a size (bytes, or a number with B, KiB, MiB, GiB, TiB)")
    return int(float(m.group(1)) * SIZE_UNITS[m.group(2) or "B"])


def override_arg(key: str, value: Any) -> str:
    """`key=value` that the command line reads back as `value`: the text itself for a plain string, else JSON
    (which YAML reads), so `[1, 8]` stays a list and the string "1" stays a string."""
    for text in ([value] if isinstance(value, str) else []) + [json.dumps(value)]:
        probe: dict = {}
        apply_override(probe, f"{key}={text}")
        if get_dotted(probe, key) == value:
            return f"{key}={text}"
    raise ValueError(f"override {key!r}: {value!r} does not survive the command line as key=value")


class RuntimeEnvSpec(Config):
    """The job's runtime_env, in Ray's keys: the project checkout as working_dir (the default), or an image."""
    working_dir: str | None = Field(None, description="folder uploaded as the job's working dir, relative to the "
                                    "project root; default: the checkout itself (.)")
    image_uri: str | None = Field(None, description="run the job inside this image (code, configs, packages baked "
                                  "in); the config is then read from the image's checkout")
    pip: list[str] = Field(default_factory=list, description="extra packages Ray installs for the job")
    env_vars: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_source_of_code(self):
        if self.image_uri and (self.working_dir or self.pip):
            raise ValueError("image_uri cannot be combined with working_dir or pip (Ray runs the job inside the "
                             "image: bake code and packages into it)")
        return self


class KubeRaySpec(Config):
    """The cluster of the job's KubeRay RayJob: worker groups of cluster/kuberay/raycluster.yaml."""
    image: str | None = Field(None, description="image of every pod; default: runtime_env.image_uri, else "
                              "${CLIPDENSE_IMAGE}")
    worker_groups: dict[str, Annotated[int, Field(ge=1)]] = Field(
        min_length=1, description="group name in raycluster.yaml -> its maxReplicas for this job")


class JobSpec(Config):
    """One ready-to-submit Ray job (jobs/NAME.yaml)."""
    description: str = Field(description="one line: what the job does and what it costs")
    stage: str = Field(description=f"one of {', '.join(JOB_STAGES)}")
    config: str | None = Field(None, description="shipped stage config: NAME or a path under configs/")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted stage-config keys -> values")
    runtime_env: RuntimeEnvSpec = RuntimeEnvSpec()
    entrypoint_num_cpus: float = Field(0, ge=0)
    entrypoint_num_gpus: float = Field(0, ge=0)
    entrypoint_memory: Annotated[int, BeforeValidator(parse_size), Field(ge=0)] = 0
    metadata: dict[str, str] = Field(default_factory=dict)
    kuberay: KubeRaySpec | None = None
    _path: Path = PrivateAttr(default=Path("job.yaml"))

    @field_validator("description")
    @classmethod
    def _one_line(cls, v: str) -> str:
        if not v.strip() or "\n" in v.strip():
            raise ValueError("one non-empty line")
        return v.strip()

    @field_validator("stage")
    @classmethod
    def _known_stage(cls, v: str) -> str:
        if v not in JOB_STAGES:
            raise ValueError(f"unknown stage (choose from {', '.join(JOB_STAGES)})")
        return v

    @field_validator("config")
    @classmethod
    def _shipped_config(cls, v: str | None, info: ValidationInfo) -> str | None:
        """Normalised to a path relative to configs/ (the same in the checkout and in the image)."""
        if v is None or "stage" not in info.data:
            return v   # no stage: its own error says so
        rel = v.removeprefix("configs/")
        rel = rel if "/" in rel else f"{info.data.get('stage')}/{rel}"
        rel = rel if rel.endswith((".yaml", ".yml")) else rel + ".yaml"
        root = configs_dir().resolve()
        path = (root / rel).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            raise ValueError(f"no shipped config configs/{rel}")
        return rel

    @field_validator("overrides")
    @classmethod
    def _override_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key, value in v.items():
            if not KEY_RE.fullmatch(key):
                raise ValueError(f"override key {key!r} is not a dotted config key (a.b.c)")
            override_arg(key, value)
        return v

    @property
    def name(self) -> str:
        return self._path.stem

    @property
    def source(self) -> str:
        return str(self._path)

    def override_args(self, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
        """The spec's overrides as `key=value`, then the command line's (applied in order: the last one wins)."""
        return [override_arg(k, v) for k, v in self.overrides.items()] + list(extra)

    def resources(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in ACTOR_OPTIONS}


def is_spec_path(arg: str) -> bool:
    return arg.endswith((".yaml", ".yml"))


def load_spec(path: str | Path) -> JobSpec:
    """The spec in `path`, validated; a mistake is one ConfigError line naming the file and the key."""
    spec = build_config(JobSpec, read_yaml(path), source=str(path))
    spec._path = Path(path)
    return spec


def check_stage_config(spec: JobSpec, extra: list[str] | tuple[str, ...] = ()):
    """The stage's config from the spec's config, its overrides and `extra` (None where the stage's module does not
    import here); a mistake names the spec file."""
    config = configs_dir() / spec.config if spec.config else None
    try:
        return validate_stage_config(spec.stage, config, spec.override_args(extra))
    except UserError as e:
        why = str(e).removeprefix(f"{config}: ")
        raise ConfigError(f"{spec.source}: config {spec.config or '(stage defaults)'} + overrides: {why}") from None


def submit_args(spec: JobSpec, extra: list[str] | tuple[str, ...] = (), **cli: Any) -> SubmitArgs:
    """What `clipdense submit` sends for the spec; `cli` holds address, token_file, job_id, follow, no_wait."""
    env = spec.runtime_env
    if env.image_uri:
        config = f"{IMAGE_ROOT}/configs/{spec.config}" if spec.config else None
        working_dir = None
    else:
        root = find_project_root()
        config = str(root / "configs" / spec.config) if spec.config else None
        working_dir = str(root / (env.working_dir or "."))
    return SubmitArgs(stage=spec.stage, config=config, overrides=spec.override_args(extra), working_dir=working_dir,
                      pip=list(env.pip), image_uri=env.image_uri, env_vars=dict(env.env_vars),
                      resources=spec.resources(), metadata={"clipdense_job": spec.name, **spec.metadata},
                      validate=False, **cli)


def _first_line(e: BaseException) -> str:
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)


def check_with_ray(spec: JobSpec, entrypoint: str, runtime_env: dict, a: SubmitArgs) -> None:
    """Ray's own checks, offline: its RuntimeEnv class, its job request and the job supervisor's actor options."""
    unknown = sorted(set(runtime_env) - set(RuntimeEnv.known_fields))
    try:
        if unknown:
            raise ValueError(f"{unknown[0]!r} is not a runtime_env key Ray knows")
        RuntimeEnv(**runtime_env)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{spec.source}: key 'runtime_env': {_first_line(e)}") from None
    for key, option in ACTOR_OPTIONS.items():
        try:
            validate_actor_options({option: a.resources[key]}, in_options=True)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{spec.source}: key {key!r}: {_first_line(e)}") from None
    try:
        JobSubmitRequest(entrypoint=entrypoint, runtime_env=runtime_env, metadata=a.job_metadata(), **a.resources)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{spec.source}: {_first_line(e)}") from None


def prepare_job(spec: JobSpec, extra: list[str] | tuple[str, ...] = (), **cli: Any) -> tuple[SubmitArgs, str, dict]:
    """(SubmitArgs, entrypoint, runtime_env) for the spec plus command-line overrides, checked here and by Ray."""
    check_stage_config(spec, extra)
    a = submit_args(spec, extra, **cli)
    try:
        entrypoint, runtime_env = build_job(a)
    except UserError as e:
        raise ConfigError(f"{spec.source}: {e}") from None
    check_with_ray(spec, entrypoint, runtime_env, a)
    return a, entrypoint, runtime_env
