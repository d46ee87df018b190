"""The suite under xdist when a worker process dies: no hang, and one rerun when Ray's own raylet aborted under it.

Two faults of pytest-xdist 3.8.0 (the newest release) turned one crashed worker into a CI run that hung until its
limit: after a crash, `--dist loadfile` hands the dead worker's finished files out again as empty work units, and a
replacement worker given a single test waits for a second one forever (xdist issues 1378 and 1327; fixes still
open upstream). `CrashSafeLoadFile` is their scheduler with both closed.

A Ray test's worker process is also Ray's driver, so when the local raylet aborts on an internal check, Ray
terminates the driver and xdist reports "worker crashed". (Ray 2.60 aborted in `HandleRequestWorkerLease` on a lease
id of the wrong size in 2 of 4 full suite runs, at the same test, and in none of 7 runs of that module alone.) Such a
test is rerun once on the replacement worker, which starts a fresh cluster; the first attempt is shown as `R` with the
raylet's fatal line. Any other crash, or a second crash of the same test, stays a failure.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from xdist.scheduler import LoadFileScheduling

_FATAL = re.compile(r"^\[[^\]]+ C \d+ \d+\] \(raylet\) (.*)$")


def _pid_dir(controller_pid: int) -> Path:
    return Path(os.environ.get("TMPDIR", "/tmp")) / f"clipdense-xdist-{controller_pid}"


def record_worker_pid(workerinput: dict) -> None:
    """In a worker: write its pid where the controller (its parent) finds it after a crash."""
    d = _pid_dir(os.getppid())
    d.mkdir(exist_ok=True)
    (d / workerinput["workerid"]).write_text(str(os.getpid()))


def raylet_abort(worker_id: str) -> str | None:
    """In the controller: the fatal line of a raylet that the worker `worker_id` started and that aborted, or None.
    Ray names each session folder after the pid of the process that started it."""
    try:
        pid = (_pid_dir(os.getpid()) / worker_id).read_text().strip()
    except OSError:
        return None
    ray_tmp = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray"
    for log in ray_tmp.glob(f"session_*_{pid}/logs/raylet.out"):
        for line in log.read_text(errors="replace").splitlines():
            fatal = _FATAL.match(line)
            if fatal:
                return fatal.group(1).strip()
    return None


class CrashSafeLoadFile(LoadFileScheduling):
    """xdist's `loadfile` scheduler with its two hangs after a worker crash closed. Files named in `exclusive` never
    run beside each other: while one is unfinished on a worker, the other workers take the next file that is not."""

    exclusive: frozenset[str] = frozenset()

    def _assign_work_unit(self, node) -> None:
        busy = any(Path(scope).name in self.exclusive and not all(unit.values())
                   for other, work in self.assigned_work.items() if other is not node for scope, unit in work.items())
        if busy:
            free = next((scope for scope in self.workqueue if Path(scope).name not in self.exclusive), None)
            if free is not None:  # else it runs anyway: a worker left with nothing is never asked again
                self.workqueue.move_to_end(free, last=False)
        super()._assign_work_unit(node)

    def remove_node(self, node):
        work = self.assigned_work.get(node, {})
        for scope in [s for s, unit in work.items() if all(unit.values())]:
            del work[scope]  # a finished file is not handed out again as an empty unit
        return super().remove_node(node)  # puts the unfinished units back, the crashed test among them

    def mark_test_pending(self, item: str) -> None:
        """The crashed test is already back in the queue (`remove_node`): a rerun needs nothing more."""

    def _reschedule(self, node) -> None:
        super()._reschedule(node)
        if not self.workqueue and not node.shutting_down:
            node.shutdown()  # its last unit is sent: it runs it out and stops instead of waiting for another


class CrashReruns:
    """The hooks, registered by conftest in the controller."""

    def __init__(self, exclusive: frozenset[str] = frozenset()) -> None:
        self.rerun: dict[str, str] = {}
        self.exclusive = exclusive

    def pytest_xdist_make_scheduler(self, config, log):
        if config.getoption("dist") != "loadfile":
            return None
        sched = CrashSafeLoadFile(config, log)
        sched.exclusive = self.exclusive
        return sched

    def pytest_handlecrashitem(self, crashitem, report, sched):
        if crashitem in self.rerun:
            return  # crashed twice: a failure
        cause = raylet_abort(report.node.gateway.id)
        if cause is None:
            return
        self.rerun[crashitem] = cause
        sched.mark_test_pending(crashitem)
        report.outcome = "rerun"
        report.longrepr = f"Ray's raylet aborted under the worker ({cause}); rerun on a fresh worker"

    def pytest_report_teststatus(self, report):
        if report.outcome == "rerun":
            return "rerun", "R", ("RERUN", {"yellow": True})
        return None

    def pytest_terminal_summary(self, terminalreporter):
        for item, cause in self.rerun.items():
            terminalreporter.write_line(f"RERUN {item}: Ray's raylet aborted under its worker: {cause}")
