"""A cluster smoke test job: spread `nodes` tasks over that many distinct nodes and report where they ran.

`clipdense submit probe nodes=2 cpus=1 --address ...` needs `nodes` worker nodes with `cpus` free CPUs each, so on an
autoscaling cluster it makes the autoscaler add nodes (a STRICT_SPREAD placement group: one bundle per node).
Prints one line `PROBE {json}` and exits 0 when every task ran on its own node.
"""
from __future__ import annotations

import json
import socket
import sys
import time

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from clipdense.ray_session import ray_session

DEFAULTS = {"nodes": 2, "cpus": 1, "seconds": 1.0, "timeout": 300.0}


def parse(argv: list[str]) -> dict:
    opts = dict(DEFAULTS)
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in DEFAULTS:
            raise ValueError(f"probe: bad argument {arg!r} (expected key=value with key in {', '.join(DEFAULTS)})")
        opts[key] = type(DEFAULTS[key])(value)
    return opts


def main(argv: list[str]) -> int:
    try:
        opts = parse(argv)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    with ray_session():  # inside a job: the cluster (RAY_ADDRESS)
        return _probe(opts)


def _probe(opts: dict) -> int:
    n, cpus = opts["nodes"], opts["cpus"]

    @ray.remote(num_cpus=cpus)
    def where(seconds: float) -> dict:
        time.sleep(seconds)
        return {"node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname()}

    start = time.time()
    pg = placement_group([{"CPU": cpus}] * n, strategy="STRICT_SPREAD")
    if not pg.wait(timeout_seconds=opts["timeout"]):
        print(f"probe: {n} nodes with {cpus} CPU each did not become available in {opts['timeout']:.0f} s",
              file=sys.stderr)
        remove_placement_group(pg)
        return 1
    placed = time.time() - start
    refs = [where.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i))
            .remote(opts["seconds"]) for i in range(n)]
    ran = ray.get(refs)
    remove_placement_group(pg)
    nodes = sorted({r["node_id"] for r in ran})
    print("PROBE " + json.dumps({"nodes_requested": n, "distinct_nodes": len(nodes), "node_ids": nodes,
                                 "seconds_to_place": round(placed, 1)}), flush=True)
    return 0 if len(nodes) == n else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
