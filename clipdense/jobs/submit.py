"""`clipdense submit STAGE|jobs/NAME.yaml [key=value ...] --address http://HEAD:8265` and job management.

    clipdense submit STAGE [--config FILE] [key=value ...] [--address URL] [--follow | --no-wait]
                     [--working-dir DIR] [--pip PKG]... [--image-uri IMG] [--token-file F] [--job-id ID] [--print]
    clipdense submit jobs/NAME.yaml [key=value ...] [--address URL] [--follow | --no-wait] [--token-file F]
                     [--job-id ID] [--print | --kuberay]
    clipdense submit status|logs|stop JOB_ID [--address URL] [--follow]
    clipdense submit list [--address URL]

The job runs `python -m clipdense.jobs.entry STAGE --config <path inside working_dir> key=value ...` with the
project checkout as its `working_dir` (uploaded by Ray, minus .venv/.git/runs/...), or, with `--image-uri`, the same
command inside that image (Ray cannot combine an image with working_dir or pip; the config path is the image's).
A job spec (clipdense.jobs.spec) holds the stage, config, overrides, runtime_env and entrypoint resources; the
command line's key=value overrides come after its own. `--print` shows the equivalent `ray job submit` command,
`--kuberay` the spec's KubeRay RayJob (clipdense.jobs.kuberay); neither submits. Without `--follow`/`--no-wait` it
waits and exits 0 if the job succeeded, 1 otherwise. User mistakes exit 2 with one line.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time

from clipdense.config import UserError
from clipdense.jobs import JOB_STAGES
from clipdense.jobs.build import SubmitArgs, build_job, ray_submit_command
from clipdense.jobs.client import make_client
from clipdense.jobs.kuberay import rayjob_yaml
from clipdense.jobs.spec import is_spec_path, load_spec, prepare_job

MANAGE = ("status", "logs", "stop", "list")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


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


def submit(a: SubmitArgs, job: tuple[str, dict] | None = None) -> int:
    """Submit (entrypoint, runtime_env) (default: built from `a`) with `a`'s resources and metadata; wait unless
    `a.no_wait`."""
    entrypoint, runtime_env = job or build_job(a)
    client = make_client(a.address, a.token_file)
    resources = {k: v for k, v in a.resources.items() if v}
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=a.job_id,
                               metadata=a.job_metadata(), **resources)
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
    p.add_argument("stage", help=f"one of {', '.join(JOB_STAGES)}; a job spec jobs/NAME.yaml; or "
                   f"{', '.join(MANAGE)} JOB_ID")
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
    p.add_argument("--print", action="store_true", dest="print_command",
                   help="print the equivalent `ray job submit` command instead of submitting")
    p.add_argument("--kuberay", action="store_true", help="(job spec) print its KubeRay RayJob manifest instead")
    return p


def _cli_args(args: argparse.Namespace) -> dict:
    return dict(address=args.address, token_file=args.token_file, job_id=args.job_id, follow=args.follow,
                no_wait=args.no_wait)


def _submit_spec(args: argparse.Namespace) -> int:
    """`clipdense submit jobs/NAME.yaml [key=value ...]`: the spec's job, or its `ray job submit` / RayJob."""
    spec = load_spec(args.stage)
    given = [flag for flag, value in (("--config", args.config), ("--working-dir", args.working_dir),
                                      ("--pip", args.pip), ("--image-uri", args.image_uri)) if value]
    if given:
        raise UserError(f"{given[0]} comes from the job spec ({args.stage}: config, runtime_env): edit the spec, "
                        "or submit the stage itself")
    if args.kuberay:
        print(rayjob_yaml(spec, args.rest), end="")
        return 0
    a, entrypoint, runtime_env = prepare_job(spec, args.rest, **_cli_args(args))
    if args.print_command:
        print(ray_submit_command(a, entrypoint, runtime_env))
        return 0
    return submit(a, (entrypoint, runtime_env))


def _submit_stage(args: argparse.Namespace) -> int:
    """`clipdense submit STAGE [--config F] [key=value ...]`."""
    if args.kuberay:
        raise UserError("--kuberay renders a job spec: clipdense submit jobs/NAME.yaml --kuberay")
    a = SubmitArgs(stage=args.stage, config=args.config, overrides=args.rest, working_dir=args.working_dir,
                   pip=args.pip, image_uri=args.image_uri, validate=not args.no_validate, **_cli_args(args))
    if args.print_command:
        print(ray_submit_command(a, *build_job(a)))
        return 0
    return submit(a)


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
        return _submit_spec(args) if is_spec_path(args.stage) else _submit_stage(args)
    except UserError as e:
        print(f"clipdense submit: error: {e}", file=sys.stderr)
        return 2
