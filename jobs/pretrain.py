"""Ray job entrypoint: `python jobs/pretrain.py --config FILE [key=value ...]`

`clipdense submit pretrain` runs this."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working_dir copy of clipdense comes first
from clipdense.jobs.entry import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run("pretrain", sys.argv[1:]))
