"""The `vllm` captioner engine on CPU: the tiny random Qwen2-VL through the real recaption pipeline.

    python -m bench.vllm_cpu [--images 1280] [--shards 10] [--image-px 160] [--quick]

Settings are docs/recaption.md's recipe, configs/recaption/vllm-cpu-tiny.yaml (3 captions of up to 16 tokens per image,
images capped at 112 x 112, bf16, enforce_eager, 1 GiB KV cache), run through a local Ray whose captioner actor
(one, 1 CPU) lives in the CPU vLLM venv that `clipdense vllm-env` builds (cached at
~/.cache/clipdense/vllm-env-<versions>, as the tests cache it). The model is written offline by
clipdense.recaption.tiny_vlm; the inputs are photo-like JPEGs of `--image-px` x 0.75 px in equal tar shards.

Two figures, measured apart:
- engine load: `import vllm` and building the captioner (`vllm.LLM(...)`, as the actor does) timed in one process
  of that venv, outside Ray;
- steady-state images/s: from the pipeline run, the rows of result blocks 2..B over the time from the first result
  block reaching the driver's writer to the last (recorded by a subclass of the writer, ShardAssembler), so Ray
  start, the actor's start, its engine load and the first block's work are left out. Result blocks follow the read
  blocks (up to 256 rows each), hence the default of several blocks' worth of images. The run's end-to-end
  images/s (all included) and its time to the first result block are reported beside it.
Random weights stop at random end tokens, so captions run up to, not exactly, 16 tokens: the figure is this model's,
not a language model's. Writes bench/results/vllm_cpu.json and .md (quiet-machine gate: bench/common.py).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

from bench.common import RESULTS, RoundLoads, load_note, row, write_report
from bench.jpeg_shards import synth_jpegs, write_shards
from clipdense.config import load_config
from clipdense.recaption import RecaptionConfig, run
from clipdense.recaption import pipeline as recaption_pipeline
from clipdense.recaption.vllm_env import VLLMEnvError, build, env_key
from clipdense.recaption.writer import ShardAssembler

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "configs" / "recaption" / "vllm-cpu-tiny.yaml"
CACHE = Path(os.environ.get("CLIPDENSE_CACHE", Path.home() / ".cache" / "clipdense"))
WORK = RESULTS / "tmp" / "vllm_cpu"

# Runs in the vLLM venv: the captioner built as the actor builds it (build_captioner), timed.
LOAD_TIMER = """
import json, sys, time
t0 = time.perf_counter()
import vllm
t1 = time.perf_counter()
from clipdense.recaption.config import EngineConfig
from clipdense.recaption.engines import build_captioner
engine = build_captioner(EngineConfig(**json.loads(sys.argv[1])))
t2 = time.perf_counter()
print("LOAD_TIMES " + json.dumps({"import_vllm_s": t1 - t0, "engine_load_s": t2 - t1}), flush=True)
"""


def vllm_python() -> str:
    """The cached CPU vLLM venv's python (built on first use by the project's own command)."""
    return str(build(CACHE / f"vllm-env-{env_key()}"))


def tiny_model(py: str, out: Path) -> str:
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([py, "-m", "clipdense.recaption.tiny_vlm", str(out)], check=True, timeout=600, capture_output=True)
    return str(out)


def recipe(py: str, model: str, inputs: list[str], out: Path, cache: Path):
    """The recaption recipe of docs/recaption.md with this bench's paths; stats off (they read outputs back)."""
    return load_config(RecaptionConfig, RECIPE, [
        f"output={out}", f"engine.model={model}", f"engine.runtime_env.py_executable={py}",
        f"engine.runtime_env.env_vars.VLLM_CACHE_ROOT={cache}", "stats.enabled=false",
    ]).model_copy(update={"input": inputs})


def engine_load(py: str, cfg) -> dict:
    env = {**os.environ, **cfg.engine.runtime_env.get("env_vars", {})}
    engine = cfg.engine.model_dump(exclude={"runtime_env"})
    p = subprocess.run([py, "-c", LOAD_TIMER, json.dumps(engine)], capture_output=True, text=True, timeout=900,
                       env=env)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("LOAD_TIMES ")), None)
    if p.returncode != 0 or line is None:
        raise RuntimeError(f"engine load failed (exit {p.returncode}): {p.stderr[-2000:]}")
    return {k: round(v, 2) for k, v in json.loads(line[len("LOAD_TIMES "):]).items()}


def pipeline(cfg) -> dict:
    """One pipeline run; steady-state images/s from the times result blocks reach the writer."""
    arrivals: list[tuple[float, int]] = []

    class TimedAssembler(ShardAssembler):
        def add(self, block):
            if block.num_rows:
                arrivals.append((time.perf_counter(), block.num_rows))
            super().add(block)

    shutil.rmtree(cfg.output, ignore_errors=True)
    t0 = time.perf_counter()
    with mock.patch.object(recaption_pipeline, "ShardAssembler", TimedAssembler):
        s = run(cfg)
    total = time.perf_counter() - t0
    if len(arrivals) < 2:
        raise RuntimeError(f"{len(arrivals)} result block(s): too few images for a steady state (raise --images)")
    steady_images, span = sum(n for _, n in arrivals[1:]), arrivals[-1][0] - arrivals[0][0]
    return {"images": s["rows_in"], "captioned": s["rows_captioned"], "failed_by_code": s["failed_by_code"],
            "seconds_end_to_end": round(total, 2), "images_per_s_end_to_end": round(s["rows_in"] / total, 2),
            "first_block_s": round(arrivals[0][0] - t0, 2), "block_rows": [n for _, n in arrivals],
            "steady_images": steady_images, "steady_seconds": round(span, 3),
            "steady_images_per_s": round(steady_images / span, 2) if span > 0 else None}


def main(argv=None, quick: bool = False) -> int:
    """`argv` None = defaults (as `python -m bench.run` calls it); `quick` is a smoke run (not a figure)."""
    ap = argparse.ArgumentParser(prog="python -m bench.vllm_cpu")
    ap.add_argument("--images", type=int, default=1280)
    ap.add_argument("--shards", type=int, default=10)
    ap.add_argument("--image-px", type=int, default=160)
    ap.add_argument("--quick", action="store_true", help="a smoke run: 3 shards of 100 images")
    ap.add_argument("--out", default=None, help="default bench/results (a --quick run: its work folder)")
    args = ap.parse_args([] if argv is None else argv)
    quick = quick or args.quick
    if quick:
        args.images, args.shards = 300, 3

    try:
        py = vllm_python()
    except VLLMEnvError as e:  # e.g. not Linux x86_64: nothing to measure here
        print(f"bench vllm_cpu: skipped: {e}", file=sys.stderr)
        return 0
    model = tiny_model(py, WORK / "tiny-vlm")
    inputs = write_shards(WORK / "shards", synth_jpegs(args.images, args.image_px), args.shards)
    cfg = recipe(py, model, inputs, WORK / "out", WORK / "vllm-cache")
    e = cfg.engine
    setting = (f"tiny random Qwen2-VL (clipdense.recaption.tiny_vlm), {e.num_captions} captions of up to "
               f"{e.max_tokens} tokens per image, max_pixels {e.max_pixels}, batch {e.batch_size}, 1 actor, "
               f"{args.shards} shards x {args.images // args.shards} JPEGs {args.image_px}x{int(args.image_px * .75)}"
               f"; configs/recaption/vllm-cpu-tiny.yaml")
    loads = RoundLoads(quick=quick)
    loads.start_round()
    load = engine_load(py, cfg)
    loads.start_round()
    run = pipeline(cfg)
    if run["captioned"] != args.images:
        raise RuntimeError(f"{args.images - run['captioned']} images not captioned: {run['failed_by_code']}")
    note = f"{setting}; {loads.note()}; {load_note()}"
    rows = [
        row("vllm_cpu", "tiny VLM steady-state images/s (pipeline, engine loaded)", run["steady_images_per_s"], None,
            "", "images/s", notes=note, rounds=loads),
        row("vllm_cpu", "tiny VLM engine load s (LLM build, import vllm apart)", load["engine_load_s"], None, "", "s",
            higher_is_better=False, notes=f"import vllm {load['import_vllm_s']} s; " + note, rounds=loads),
        row("vllm_cpu", "tiny VLM end-to-end images/s (Ray + actor start + load included)",
            run["images_per_s_end_to_end"], None, "", "images/s",
            notes=f"first result block after {run['first_block_s']} s; " + note, rounds=loads),
    ]
    name = "vllm_cpu_quick" if quick else "vllm_cpu"  # a smoke run never overwrites the figure
    out = Path(args.out or (WORK if quick else RESULTS))  # a smoke run stays out of the results table
    md = write_report(name, "vLLM captioner on CPU (tiny VLM, real pipeline)", __doc__, rows, out)
    detail = {"engine_load": load, "pipeline": run, "settings": setting}
    path = out / f"{name}.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **detail}, indent=2))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
