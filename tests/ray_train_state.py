"""Reading Ray Train V2's run state from its storage folder, for tests that kill workers."""
import json
from pathlib import Path


def registered_checkpoint_step(out: Path) -> int:
    """The step of the newest checkpoint Ray Train's controller has registered (its checkpoint manager snapshot),
    -1 if none yet. A worker's report is registered only when the controller next polls every worker, so a
    checkpoint written but not yet registered is lost with a node killed in between: the run then resumes from
    the one before (CI once saw step 3 after a kill at step 7)."""
    for snap in out.glob("*/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(snap.read_text()).get("latest_checkpoint_result") or {}
        except (OSError, ValueError):  # being rewritten
            continue
        name = latest.get("checkpoint_dir_name") or ""
        if name.startswith("step_"):
            return int(name.removeprefix("step_"))
    return -1
