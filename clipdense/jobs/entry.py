"""What a Ray job runs: join the cluster, then run one stage through the CLI's dispatcher.

`jobs/<stage>.py` call `run(stage, argv)`; images without the checkout can run `python -m clipdense.jobs.entry
STAGE --config FILE [key=value ...]` instead.
"""
from __future__ import annotations

import os
import sys


def connect_ray() -> None:
    """Join the running cluster if there is one (inside a Ray job RAY_ADDRESS is set); else the stage starts Ray."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address="auto")
        return
    try:
        ray.init(address="auto")
    except ConnectionError:
        pass  # no cluster here: the stage runs on a local Ray of its own


def run(stage: str, argv: list[str]) -> int:
    connect_ray()
    if stage == "probe":
        from clipdense.jobs.probe import main as probe_main

        return probe_main(argv)
    from clipdense.cli import main

    return main([stage, *argv])


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print("usage: python -m clipdense.jobs.entry STAGE [--config FILE] [key=value ...]", file=sys.stderr)
        sys.exit(2)
    sys.exit(run(sys.argv[1], sys.argv[2:]))
