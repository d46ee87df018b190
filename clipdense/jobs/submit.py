"""`clipdense submit STAGE --config FILE [key=value ...] --address http://HEAD:8265` and job management.

    clipdense submit STAGE [--config FILE] [key=value ...] [--address URL] [--follow | --no-wait]
                     [--working-dir DIR] [--pip PKG]... [--image-uri IMG] [--token-file F] [--job-id ID]
    clipdense submit status|logs|stop JOB_ID [--address URL] [--follow]
    clipdense submit list [--address URL]

The job runs `python -m clipdense.jobs.entry STAGE --config <path inside working_dir> key=value ...` with the
project checkout as its `working_dir` (uploaded by Ray, minus .venv/.git/runs/...), or, with `--image-uri`, the same
command inside that image (Ray cannot combine an image with working_dir or pip; the config path is the image's).
Without
`--follow`/`--no-wait` it waits and exits 0 if the job succeeded, 1 otherwise. User mistakes exit 2 with one line.
"""
from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from clipdense.config import UserError, apply_override, read_yaml
from clipdense.jobs import JOB_STAGES
from clipdense.jobs.client import make_client

MANAGE = ("status", "logs", "stop", "list")
# Never uploaded: environments, VCS, outputs, caches (Ray also honours .gitignore / .rayignore).
EXCLUDES = [".venv/", "venv/", ".git/", "runs/", "out/", "build/", "dist/", "*.egg-info/", "__pycache__/",
            ".pytest_cache/", "bench/results/", ".whl/", ".gl/", "*.pt", "*.ckpt", "*.safetensors"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
ENTRY_FILE = "clipdense/jobs/entry.py"   # the one job entry point, run as `python -m clipdense.jobs.entry`


@dataclass
class SubmitArgs:
    """Everything one submission needs (what `clipdense submit STAGE ...` parses into)."""
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


def _config_in_working_dir(config: Path, working_dir: Path) -> str:
    """The config's path relative to working_dir (so the job can read it there), or a one-line error."""
    try:
        return config.resolve().relative_to(working_dir).as_posix()
    except ValueError:
        raise UserError(f"config {config} is outside the working dir {working_dir}, so the job could not read it: "
                        "move it under the working dir or pass --working-dir") from None


def _validate_config(stage: str, config: Path | None, overrides: list[str]) -> None:
    """Catch config mistakes here rather than after the cluster has scaled up: YAML + overrides, then the
    stage's own config class when it imports on this machine."""
    data = read_yaml(config) if config else {}
    for o in overrides:
        apply_override(data, o)
    from clipdense.cli import STAGES

    if stage not in STAGES:
        return
    module_name, cls_name = STAGES[stage]
    try:
        import importlib

        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError):
        return  # the stage's dependencies may live only on the cluster; the job validates there
    from clipdense.config import load_config

    load_config(cls, config, overrides)


def entry_command(stage: str, args: list[str]) -> str:
    """The job's entrypoint: the one entry module with the stage and its arguments."""
    return shlex.join(["python", "-m", "clipdense.jobs.entry", stage, *args])


def build_job(a: SubmitArgs) -> tuple[str, dict]:
    """(entrypoint, runtime_env) for a submission; raises UserError for unknown stages and stray config files."""
    if a.stage not in JOB_STAGES:
        raise UserError(f"unknown stage {a.stage!r} (choose from {', '.join(JOB_STAGES)})")
    for o in a.overrides:
        if "=" not in o:
            raise UserError(f"argument {o!r} is not of the form key=value")
    if a.stage == "probe":
        from clipdense.jobs.probe import parse

        try:
            parse(a.overrides)
        except ValueError as e:
            raise UserError(str(e)) from None
    config = Path(a.config).expanduser() if a.config else None
    if a.image_uri:
        if a.pip or a.working_dir:
            raise UserError("--image-uri cannot be combined with --pip or --working-dir (Ray runs the job inside "
                            "the image; bake packages and code into it)")
        args = (["--config", a.config] if a.config else []) + a.overrides
        return entry_command(a.stage, args), {"image_uri": a.image_uri, "env_vars": {"PYTHONUNBUFFERED": "1"}}
    working_dir = Path(a.working_dir).expanduser().resolve() if a.working_dir else find_project_root()
    if not working_dir.is_dir():
        raise UserError(f"working dir not found: {working_dir}")
    if not (working_dir / ENTRY_FILE).is_file():
        raise UserError(f"{working_dir / ENTRY_FILE} not found: --working-dir must be the project checkout")
    args = []
    if config is not None:
        if not config.is_file():
            raise UserError(f"config file not found: {config}")
        args = ["--config", _config_in_working_dir(config, working_dir)]
    if a.validate and a.stage != "probe":
        _validate_config(a.stage, config, a.overrides)
    entry = entry_command(a.stage, [*args, *a.overrides])
    runtime_env: dict = {"working_dir": str(working_dir), "excludes": list(EXCLUDES),
                         "env_vars": {"PYTHONUNBUFFERED": "1"}}
    if a.pip:
        runtime_env["pip"] = list(a.pip)
    return entry, runtime_env


async def _stream_logs(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def wait_for_job(client, job_id: str, follow: bool, poll_s: float = 2.0) -> int:
    """Stream logs (follow) or poll until the job ends; 0 if it succeeded, 1 otherwise."""
    if follow:
        asyncio.run(_stream_logs(client, job_id))
    last = None
    while True:
        status = str(client.get_job_status(job_id).value)
        if status != last:
            print(f"job {job_id}: {status}", file=sys.stderr, flush=True)
            last = status
        if status in TERMINAL:
            break
        time.sleep(poll_s)
    if status != "SUCCEEDED":
        info = client.get_job_info(job_id)
        if info.message:
            print(f"job {job_id}: {info.message.strip().splitlines()[-1]}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


def submit(a: SubmitArgs) -> int:
    entrypoint, runtime_env = build_job(a)
    client = make_client(a.address, a.token_file)
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=a.job_id,
                               metadata={"clipdense_stage": a.stage})
    print(job_id, flush=True)
    print(f"submitted {a.stage} as {job_id}: {entrypoint}", file=sys.stderr, flush=True)
    if a.no_wait:
        return 0
    try:
        return wait_for_job(client, job_id, a.follow)
    except KeyboardInterrupt:
        print(f"detached; the job keeps running (clipdense submit stop {job_id} --address ...)", file=sys.stderr)
        return 130


def manage(action: str, job_id: str | None, address: str | None, token_file: str | None, follow: bool) -> int:
    client = make_client(address, token_file)
    if action == "list":
        for job in client.list_jobs():
            print(f"{job.submission_id}\t{job.status.value}\t{job.entrypoint}")
        return 0
    try:
        info = client.get_job_info(job_id)
    except RuntimeError:
        raise UserError(f"no job {job_id!r} on the cluster") from None
    if action == "status":
        print(f"{job_id}\t{info.status.value}\t{(info.message or '').strip()}")
        return 0
    if action == "stop":
        stopped = client.stop_job(job_id)
        print(f"{job_id}\t{'stop requested' if stopped else 'already finished: ' + info.status.value}")
        return 0
    if follow:
        asyncio.run(_stream_logs(client, job_id))
    else:
        print(client.get_job_logs(job_id), end="")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clipdense submit", description=__doc__.split("\n\n")[0])
    p.add_argument("stage", help=f"one of {', '.join(JOB_STAGES)}; or {', '.join(MANAGE)} JOB_ID")
    p.add_argument("rest", nargs="*", metavar="key=value", help="config overrides (or the JOB_ID)")
    p.add_argument("--config", help="stage config YAML (must lie inside the working dir)")
    p.add_argument("--address", help="dashboard URL, e.g. http://127.0.0.1:8265 (default: $RAY_API_SERVER_ADDRESS)")
    p.add_argument("--follow", action="store_true", help="stream the job's logs; exit with its status")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    p.add_argument("--working-dir", help="folder uploaded as the job's working_dir (default: the project root)")
    p.add_argument("--pip", action="append", default=[], metavar="PKG", help="extra pip package (repeatable)")
    p.add_argument("--image-uri", help="run the job in this container image (code and packages baked in)")
    p.add_argument("--token-file", help="Ray auth token file (default: $RAY_AUTH_TOKEN(_PATH), ~/.ray/auth_token)")
    p.add_argument("--job-id", help="submission id to use (default: generated)")
    p.add_argument("--no-validate", action="store_true", help="skip checking the config on this machine")
    return p


def main_submit(argv: list[str]) -> int:
    """Entry for `clipdense submit ...`; returns the exit code (2 with a one-line message for user mistakes)."""
    try:
        # intermixed: `STAGE --config F a=1 --follow b=2` keeps both overrides
        args = _parser().parse_intermixed_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        if args.stage in MANAGE:
            if args.stage != "list" and len(args.rest) != 1:
                raise UserError(f"usage: clipdense submit {args.stage} JOB_ID --address URL")
            return manage(args.stage, args.rest[0] if args.rest else None, args.address, args.token_file,
                          args.follow)
        if args.follow and args.no_wait:
            raise UserError("--follow and --no-wait exclude each other")
        return submit(SubmitArgs(stage=args.stage, address=args.address, config=args.config, overrides=args.rest,
                                 working_dir=args.working_dir, pip=args.pip, image_uri=args.image_uri,
                                 token_file=args.token_file, job_id=args.job_id, follow=args.follow,
                                 no_wait=args.no_wait, validate=not args.no_validate))
    except UserError as e:
        print(f"clipdense submit: error: {e}", file=sys.stderr)
        return 2
