"""A job for the local-cluster tests, run with the project checkout as its working_dir (as `clipdense submit` does).

    python tests/working_dir_job.py holder STOP_FILE   one actor on a worker node watches its working dir until
                                                       STOP_FILE exists
    python tests/working_dir_job.py short N            N actors (1 CPU each, so new nodes) check it once

Each actor checks what the failing captioners needed: its cwd still exists (os.path.abspath calls os.getcwd), the
job's package is still there, and the directory is the one it started in (same inode: not deleted and unpacked
again). Prints `WDREADY` once the holder watches, then `WDCHECK {json}`; exits 1 if any check failed.
"""
from __future__ import annotations

import json
import os
import sys
import time

import ray

PACKAGE_FILE = "clipdense/recaption/pipeline.py"


@ray.remote(num_cpus=1)
class WorkingDirWatcher:
    def __init__(self):
        self.cwd = os.getcwd()
        self.inode = os.stat(self.cwd).st_ino
        self.node = ray.get_runtime_context().get_node_id()

    def check(self) -> list[str]:
        problems = []
        try:
            os.path.abspath("x")
        except FileNotFoundError as e:
            problems.append(f"cwd vanished: {e}")
        if not os.path.isfile(os.path.join(self.cwd, PACKAGE_FILE)):
            problems.append(f"{PACKAGE_FILE} gone from {self.cwd}")
        try:
            if os.stat(self.cwd).st_ino != self.inode:
                problems.append(f"{self.cwd} was deleted and unpacked again")
        except FileNotFoundError:
            problems.append(f"{self.cwd} is gone")
        return problems

    def watch(self, stop_file: str | None, max_s: float) -> dict:
        checks, problems, end = 0, [], time.time() + max_s
        while True:
            checks += 1
            problems += [p for p in self.check() if p not in problems]
            if stop_file is None or os.path.exists(stop_file) or time.time() > end:
                return {"node": self.node, "cwd": self.cwd, "checks": checks, "problems": problems}
            time.sleep(0.2)


def main(role: str, arg: str) -> int:
    ray.init()
    if role == "holder":
        actor = WorkingDirWatcher.remote()
        ray.get(actor.check.remote())
        print("WDREADY", flush=True)
        results = [ray.get(actor.watch.remote(arg, 600))]
    else:
        actors = [WorkingDirWatcher.remote() for _ in range(int(arg))]
        results = ray.get([a.watch.remote(None, 0) for a in actors])
    print("WDCHECK " + json.dumps(results), flush=True)
    return 1 if any(r["problems"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
