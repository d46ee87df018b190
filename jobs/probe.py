"""Ray job entrypoint: `python jobs/probe.py [nodes=2 cpus=1 seconds=1 timeout=300]`

`clipdense submit probe` runs this."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working_dir copy of clipdense comes first
from clipdense.jobs.entry import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run("probe", sys.argv[1:]))
