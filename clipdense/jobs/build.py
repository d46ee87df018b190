"""What one submission sends to Ray: the entrypoint, the runtime_env, the entrypoint resources and metadata.

`clipdense submit STAGE ...` and `clipdense submit jobs/NAME.yaml` both end here (`SubmitArgs` -> `build_job`), and
`ray_submit_command` prints the same job as Ray's own `ray job submit` command line.
"""
from __future__ import annotations

import importlib
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from clipdense.cli import STAGES
from clipdense.config import UserError, apply_override, load_config, read_yaml
from clipdense.config.provenance import CODE_VERSION_ENV, PACKAGE_DIR, code_version, format_code_version, git_version
from clipdense.jobs import JOB_STAGES
from clipdense.jobs.client import read_token
from clipdense.jobs.probe import parse as parse_probe_args

# Never uploaded: environments, VCS, outputs, caches (Ray also honours .gitignore / .rayignore).
EXCLUDES = [".venv/", "venv/", ".git/", "runs/", "out/", "build/", "dist/", "*.egg-info/", "__pycache__/",
            ".pytest_cache/", "bench/results/", ".whl/", ".gl/", "*.pt", "*.ckpt", "*.safetensors"]
ENTRY_FILE = "clipdense/jobs/entry.py"   # the one job entry point, run as `python -m clipdense.jobs.entry`
BASE_ENV_VARS = {"PYTHONUNBUFFERED": "1"}
# Ray's names for what a job reserves for its driver (`ray job submit --entrypoint-num-cpus ...`)
RESOURCE_KEYS = ("entrypoint_num_cpus", "entrypoint_num_gpus", "entrypoint_memory")


@dataclass
class SubmitArgs:
    """Everything one submission needs (what `clipdense submit STAGE ...` or a job spec parses into)."""
    stage: str
    address: str | None = None
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    working_dir: str | None = None
    pip: list[str] = field(default_factory=list)
    image_uri: str | None = None
    token_file: str | None = None
    job_id: str | None = None
    follow: bool = False
    no_wait: bool = False
    validate: bool = True
    env_vars: dict[str, str] = field(default_factory=dict)
    resources: dict[str, float] = field(default_factory=dict)   # RESOURCE_KEYS -> amount (memory in bytes)
    metadata: dict[str, str] = field(default_factory=dict)

    def job_metadata(self) -> dict[str, str]:
        return {"clipdense_stage": self.stage, **self.metadata}


def find_project_root(start: Path | None = None) -> Path:
    """The checkout holding `pyproject.toml` and the job entry point: from the cwd upwards, else where this
    package lives."""
    here = (start or Path.cwd()).resolve()
    candidates = [here, *here.parents, Path(__file__).resolve().parents[2]]
    for d in candidates:
        if (d / "pyproject.toml").is_file() and (d / ENTRY_FILE).is_file():
            return d
    raise UserError(f"cannot find the project root (a folder with pyproject.toml and {ENTRY_FILE}): run from the "
                    "checkout or pass --working-dir")


def stage_config_class(stage: str) -> type | None:
    """The stage's config class, or None where it has none or its module does not import on this machine (its
    dependencies may live only on the cluster; the job validates there)."""
    if stage not in STAGES:
        return None
    module_name, cls_name = STAGES[stage]
    try:
        return getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError):
        return None


def validate_stage_config(stage: str, config: Path | None, overrides: list[str]):
    """Catch config mistakes here rather than after the cluster has scaled up: YAML + overrides, then the
    stage's own config class when it imports on this machine. Returns the config built (None if not built)."""
    if stage == "probe":
        try:
            parse_probe_args(overrides)
        except ValueError as e:
            raise UserError(str(e)) from None
        return None
    data = read_yaml(config) if config else {}
    for o in overrides:
        apply_override(data, o)
    cls = stage_config_class(stage)
    return load_config(cls, config, overrides) if cls is not None else None


def _config_in_working_dir(config: Path, working_dir: Path) -> str:
    """The config's path relative to working_dir (so the job can read it there), or a one-line error."""
    try:
        return config.resolve().relative_to(working_dir).as_posix()
    except ValueError:
        raise UserError(f"config {config} is outside the working dir {working_dir}, so the job could not read it: "
                        "move it under the working dir or pass --working-dir") from None


def entry_command(stage: str, args: list[str]) -> str:
    """The job's entrypoint: the one entry module with the stage and its arguments."""
    return shlex.join(["python", "-m", "clipdense.jobs.entry", stage, *args])


def _check_args(a: SubmitArgs) -> None:
    if a.stage not in JOB_STAGES:
        raise UserError(f"unknown stage {a.stage!r} (choose from {', '.join(JOB_STAGES)})")
    for o in a.overrides:
        if "=" not in o:
            raise UserError(f"argument {o!r} is not of the form key=value")
    if a.image_uri and (a.pip or a.working_dir):
        raise UserError("--image-uri cannot be combined with --pip or --working-dir (Ray runs the job inside "
                        "the image; bake packages and code into it)")


def _image_job(a: SubmitArgs, env_vars: dict[str, str]) -> tuple[str, dict]:
    if a.stage == "probe":
        validate_stage_config(a.stage, None, a.overrides)
    args = (["--config", a.config] if a.config else []) + a.overrides
    return entry_command(a.stage, args), {"image_uri": a.image_uri, "env_vars": env_vars}


def code_version_env(working_dir: Path) -> dict[str, str]:
    """CLIPDENSE_CODE_VERSION for a job whose working_dir is uploaded without .git (EXCLUDES), so its results
    still record the commit: that of the uploaded checkout (when it is this package's own: as this process knows
    it, e.g. from its own CLIPDENSE_CODE_VERSION inside a job); none for a folder that is no git checkout."""
    version = git_version(working_dir / "clipdense")
    if version is None and working_dir.resolve() == PACKAGE_DIR.parent:
        version = code_version()
    value = format_code_version(version or {})
    return {CODE_VERSION_ENV: value} if value else {}


def build_job(a: SubmitArgs) -> tuple[str, dict]:
    """(entrypoint, runtime_env) for a submission; raises UserError for unknown stages and stray config files."""
    _check_args(a)
    env_vars = {**BASE_ENV_VARS, **a.env_vars}
    if a.image_uri:
        return _image_job(a, env_vars)
    working_dir = Path(a.working_dir).expanduser().resolve() if a.working_dir else find_project_root()
    if not working_dir.is_dir():
        raise UserError(f"working dir not found: {working_dir}")
    if not (working_dir / ENTRY_FILE).is_file():
        raise UserError(f"{working_dir / ENTRY_FILE} not found: --working-dir must be the project checkout")
    config = Path(a.config).expanduser() if a.config else None
    args = []
    if config is not None:
        if not config.is_file():
            raise UserError(f"config file not found: {config}")
        args = ["--config", _config_in_working_dir(config, working_dir)]
    if a.validate or a.stage == "probe":
        validate_stage_config(a.stage, config, a.overrides)
    env_vars = {**code_version_env(working_dir), **env_vars}  # the user's own value wins
    runtime_env: dict = {"working_dir": str(working_dir), "excludes": list(EXCLUDES), "env_vars": env_vars}
    if a.pip:
        runtime_env["pip"] = list(a.pip)
    return entry_command(a.stage, [*args, *a.overrides]), runtime_env


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _auth_prefix(token_file: str | None) -> list[str]:
    """Ray's own client sends the token only with RAY_AUTH_MODE=token (and reads it from where we do)."""
    if read_token(token_file) is None:
        return []
    prefix = ["env", "RAY_AUTH_MODE=token"]   # `env`: an assignment stays one even when quoted
    return prefix + ([f"RAY_AUTH_TOKEN_PATH={Path(token_file).expanduser()}"] if token_file else [])


def ray_submit_command(a: SubmitArgs, entrypoint: str, runtime_env: dict) -> str:
    """The `ray job submit` command line that submits the same job (`clipdense submit ... --print`)."""
    cmd = [*_auth_prefix(a.token_file), "ray", "job", "submit"]
    if a.address:
        cmd += ["--address", a.address]
    if a.job_id:
        cmd += ["--submission-id", a.job_id]
    cmd += ["--runtime-env-json", json.dumps(runtime_env, sort_keys=True)]
    cmd += ["--metadata-json", json.dumps(a.job_metadata(), sort_keys=True)]
    for key in RESOURCE_KEYS:
        if a.resources.get(key):
            cmd += ["--" + key.replace("_", "-"), _number(a.resources[key])]
    if a.no_wait:
        cmd.append("--no-wait")
    return shlex.join(cmd + ["--", *shlex.split(entrypoint)])
