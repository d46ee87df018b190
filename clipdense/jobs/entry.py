"""What a Ray job runs: `python -m clipdense.jobs.entry STAGE [--config FILE] [key=value ...]`.

One entry point for every stage (`clipdense.jobs.JOB_STAGES`), with the project checkout as the job's working_dir
(`-m` puts the working dir first on sys.path, so the uploaded clipdense wins over an installed one) or inside an
image that has clipdense installed. The stage joins the cluster itself: Ray sets RAY_ADDRESS for a job's driver,
and `clipdense.ray_session` joins it.
"""
from __future__ import annotations

import sys

from clipdense.cli import main as cli_main
from clipdense.jobs import JOB_STAGES
from clipdense.jobs.probe import main as probe_main

USAGE = "usage: python -m clipdense.jobs.entry STAGE [--config FILE] [key=value ...]"


def run(stage: str, argv: list[str]) -> int:
    if stage not in JOB_STAGES:
        print(f"unknown stage {stage!r} (choose from {', '.join(JOB_STAGES)})", file=sys.stderr)
        return 2
    if stage == "probe":
        return probe_main(argv)
    return cli_main([stage, *argv])  # the CLI loads the stage's package (torch ...) only now


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    sys.exit(run(sys.argv[1], sys.argv[2:]))
