"""Run every benchmark (or the named ones) and write bench/results/<name>.json plus bench/results/README.md.

    python -m bench.run                 # all CPU benchmarks
    python -m bench.run pretrain data   # a subset (`pretrain` includes bf16: bf16 vs fp32 and the step's MFU)
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

# a name runs one module or several (in order); running every bench runs each module once
CPU_BENCHES = {
    "pretrain": ("bench.pretrain_vs_open_clip", "bench.bf16_cpu"),   # + bf16 vs fp32 and the step's CPU MFU
    "bf16": "bench.bf16_cpu",
    "data": "bench.data_decode",
    "recaption": "bench.recaption_echo",
    "recaption-scale": "bench.recaption_scale",
    "teachers": "bench.teacher_forward",
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
    failed, done = [], set()
    for name in names:
        if name not in table:
            print(f"unknown benchmark {name!r}; choose from {sorted(table)}", file=sys.stderr)
            return 2
        modules = table[name] if isinstance(table[name], tuple) else (table[name],)
        for module in modules:
            if module in done:
                continue
            done.add(module)
            print(f"== bench {name}" + (f" ({module})" if len(modules) > 1 else ""), flush=True)
            try:
                fn = importlib.import_module(module).main
                kwargs = {"quick": args.quick}
                if "full" in inspect.signature(fn).parameters:
                    kwargs["full"] = args.full
                fn(**kwargs)
            except Exception:
                traceback.print_exc()
                failed.append(name if len(modules) == 1 else f"{name} ({module})")
    write_table()
    print((RESULTS / "README.md").read_text())
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
