"""Run every benchmark (or the named ones) and write bench/results/<name>.json plus bench/results/README.md.

    python -m bench.run                 # all CPU benchmarks
    python -m bench.run pretrain data   # a subset
    python -m bench.run --gpu           # GPU mode (CUDA present): ViT-B/16, MobileCLIP-S2, CoCa ViT-L/14, UperNet
    python -m bench.run --quick         # smaller inputs (smoke run); `--full` adds the default-scale demo's wall time

Each benchmark measures clipdense against a peer in the same run, on the same inputs, and reports the ratio.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import sys
import traceback

from bench.common import RESULTS, latest_figures, markdown

CPU_BENCHES = {
    "pretrain": "bench.pretrain_vs_open_clip",
    "data": "bench.data_decode",
    "recaption": "bench.recaption_echo",
    "recaption-scale": "bench.recaption_scale",
    "finetune": "bench.finetune_step",
    "demo": "bench.demo_wall",
    "eval": "bench.eval_zeroshot",
    "vllm-cpu": "bench.vllm_cpu",
}
GPU_BENCHES = {"gpu": "bench.gpu"}


def write_table() -> None:
    payloads = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    (RESULTS / "README.md").write_text("# Benchmark results\n\nRegenerate with `python -m bench.run`.\n\n"
                                       + markdown(latest_figures(payloads)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run")
    ap.add_argument("names", nargs="*", help=f"subset of {sorted(CPU_BENCHES) + sorted(GPU_BENCHES)}")
    ap.add_argument("--gpu", action="store_true", help="run the GPU benchmarks")
    ap.add_argument("--quick", action="store_true", help="smaller inputs (smoke run)")
    ap.add_argument("--full", action="store_true", help="also time slow variants (the default-scale demo)")
    args = ap.parse_args(argv)
    table = {**CPU_BENCHES, **GPU_BENCHES}
    names = args.names or (list(GPU_BENCHES) if args.gpu else list(CPU_BENCHES))
    failed = []
    for name in names:
        if name not in table:
            print(f"unknown benchmark {name!r}; choose from {sorted(table)}", file=sys.stderr)
            return 2
        print(f"== bench {name}", flush=True)
        try:
            fn = importlib.import_module(table[name]).main
            kwargs = {"quick": args.quick}
            if "full" in inspect.signature(fn).parameters:
                kwargs["full"] = args.full
            fn(**kwargs)
        except Exception:
            traceback.print_exc()
            failed.append(name)
    write_table()
    print((RESULTS / "README.md").read_text())
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
