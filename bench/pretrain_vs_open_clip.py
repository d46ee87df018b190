"""Pretraining throughput: clipdense pretrain vs `python -m open_clip_train.main`, same run, same inputs.

    python -m bench.pretrain_vs_open_clip [--images 1536] [--batch 32] [--threads 1] [--rounds 2] [--epochs 3]
                                          [--quick]

Both train the tiny open_clip model `clip-tiny` (2-layer width-64 ViT and text tower, 64 px) on the same 96 px
JPEG files and captions for 3 epochs (`data.cache` off: every epoch decodes again, as the peer's loader does), fp32
on CPU, one training process, batch 32: open_clip_train reads a CSV with 1 data loader worker; clipdense reads the
same JPEG bytes from webdataset tars through Ray Data (decode in Ray tasks; crop, caption choice and tokenisation in
the worker's collate; `ray.in_process`, so Ray Data's executor loop runs as a thread of the training process).
Ours runs its defaults, including torch's fused AdamW (`train.optim.fused`); a third side runs ours with
`optim.fused: false` (torch's default AdamW, as the peer's), which shows the data path's and loop's share without the
optimizer kernel. Throughput is samples/s per log interval (wall time of the interval, data waits included, as
open_clip_train's `Batch (t)`), median after the first; both sides use the same torch thread count and alternate runs
(thread oversubscription on a shared box swings step times tenfold).
Also reported: how long tokenising one batch's captions takes in the worker, against the step time (why
tokenisation stays in the worker rather than tokenising all N+1 captions per sample in Ray Data).
Writes bench/results/pretrain_vs_open_clip.json and .md.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch
from PIL import Image

from bench.common import RoundLoads, markdown, row, save
from clipdense.config import build_config, configs_dir
from clipdense.models import tokenizer_for
from clipdense.pretrain import PretrainConfig, run

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square"]


def make_inputs(root: Path, n: int, px: int = 96, shards: int = 4) -> tuple[Path, list[Path]]:
    """n JPEGs as files + CSV (open_clip_train) and the same bytes in tar shards (clipdense)."""
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows, tars = [], [tarfile.open(root / f"{s:05d}.tar", "w") for s in range(shards)]
    for i in range(n):
        c, s = COLOURS[i % len(COLOURS)], SHAPES[(i // len(COLOURS)) % 2]
        img = (rng.normal(128, 30, (px, px, 3))).clip(0, 255).astype(np.uint8)
        img[px // 4: 3 * px // 4, px // 4: 3 * px // 4] = rng.integers(0, 255, 3)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        path = root / "img" / f"{i:06d}.jpg"
        path.write_bytes(buf.getvalue())
        caption = f"a {c} {s}"
        rows.append({"filepath": str(path), "title": caption})
        tar = tars[i % shards]
        for ext, data in (("jpg", buf.getvalue()), ("txt", caption.encode())):
            info = tarfile.TarInfo(f"{i:06d}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    for t in tars:
        t.close()
    with open(root / "train.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["filepath", "title"])
        w.writeheader()
        w.writerows(rows)
    return root / "train.csv", [root / f"{s:05d}.tar" for s in range(shards)]


OPEN_CLIP_WRAPPER = (
    "import sys, open_clip; from open_clip_train.main import main; "
    "open_clip.add_model_config(sys.argv[1]); main(sys.argv[2:])"
)


def run_open_clip_train(csv_path: Path, logs: Path, batch: int, steps_log: int,
                        threads: int, epochs: int = 3) -> tuple[list[float], float]:
    argv = [sys.executable, "-c", OPEN_CLIP_WRAPPER, str(configs_dir() / "models" / "clip-tiny.json"),
            "--dataset-type", "csv", "--train-data", str(csv_path), "--csv-img-key", "filepath",
            "--csv-caption-key", "title", "--csv-separator", ",", "--model", "clip-tiny", "--batch-size", str(batch),
            "--epochs", str(epochs), "--workers", "1", "--precision", "fp32", "--lr", "1e-3", "--warmup", "10",
            "--device", "cpu", "--logs", str(logs), "--name", "bench", "--log-every-n-steps", str(steps_log),
            "--save-frequency", "0", "--zeroshot-frequency", "0", "--val-frequency", "0", "--report-to", ""]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(threads)})
    wall = time.perf_counter() - t0
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"open_clip_train failed:\n{text[-3000:]}")
    # "Batch (t): 0.105, 304.1/s, 304.1/s/gpu": the interval's mean batch time -> samples/s
    avgs = [float(m) for m in re.findall(r"Batch \(t\): ([0-9.]+),", text)]
    return [batch / a for a in avgs if a > 0], wall


def run_clipdense(tars: list[Path], out: Path, batch: int, steps: int, steps_log: int,
                  fused: bool = True) -> tuple[list[float], float]:
    cfg = build_config(PretrainConfig, {
        "model": {"name": "clip-tiny"}, "captions": {"policy": "real"}, "ray": {"in_process": True},
        "data": {"shards": [str(t) for t in tars], "batch_size": batch, "decode_cpus": 1, "count_errors": False},
        "train": {"out_dir": str(out), "optim": {"lr": 1e-3, "fused": fused},
                  "schedule": {"total_steps": steps, "warmup_steps": 10}, "log_every": steps_log,
                  "checkpoint": {"every_steps": 0}, "scaling": {"precision": "fp32"}}})
    t0 = time.perf_counter()
    run(cfg)
    wall = time.perf_counter() - t0
    logs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["samples_per_s"] for r in logs if "samples_per_s" in r and r["step"] % steps_log == 0], wall


def tokenize_cost(batch: int, repeats: int = 20) -> float:
    """Seconds to tokenise one batch of captions with open_clip's tokenizer (what the worker collate does)."""
    tok = tokenizer_for("clip-tiny")
    texts = [f"a {COLOURS[i % 6]} {SHAPES[i % 2]} on a textured floor" for i in range(batch)]
    tok(texts)
    t0 = time.perf_counter()
    for _ in range(repeats):
        tok(texts)
    return (time.perf_counter() - t0) / repeats


def main(quick: bool = False, images: int | None = None, batch: int = 32, threads: int = 1,
         rounds: int | None = None, epochs: int = 3) -> list[dict]:
    n = images or (512 if quick else 1536)
    steps = epochs * (n // batch)  # the same epochs as open_clip_train runs, every one decoded again
    steps_log = 4 if quick else 8
    rounds = rounds or (1 if quick else 2)
    # Same compute threads on both sides: on a small shared box, thread oversubscription swings step times by
    # 10x, so the runs also alternate (peer, ours, peer, ours) and report medians over every interval.
    torch.set_num_threads(threads)
    ours, peer, ours_wall, peer_wall, unfused = [], [], [], [], []
    loads = RoundLoads(quick=quick)
    with tempfile.TemporaryDirectory(prefix="bench-pretrain-") as tmp:
        root = Path(tmp)
        csv_path, tars = make_inputs(root / "data", n)
        for r in range(rounds):
            loads.start_round()
            sps, wall = run_open_clip_train(csv_path, root / f"peer{r}", batch, steps_log, threads, epochs)
            peer += sps[1:] if len(sps) > 2 else sps
            peer_wall.append(wall)
            loads.start_round()
            sps, wall = run_clipdense(tars, root / f"ours{r}", batch, steps, steps_log)
            ours += sps[1:] if len(sps) > 2 else sps
            ours_wall.append(wall)
            loads.start_round()
            sps, _ = run_clipdense(tars, root / f"unfused{r}", batch, steps, steps_log, fused=False)
            unfused += sps[1:] if len(sps) > 2 else sps
    if ray.is_initialized():
        ray.shutdown()
    tok_s = tokenize_cost(batch)
    ours_sps, peer_sps, unfused_sps = statistics.median(ours), statistics.median(peer), statistics.median(unfused)
    ours_wall, peer_wall = statistics.median(ours_wall), statistics.median(peer_wall)
    step_s = batch / ours_sps
    notes = (f"clip-tiny 64px, batch {batch}, {n} JPEGs (96px) x {epochs} epochs (each decoded again), fp32 CPU, "
             f"1 process, {threads} torch thread(s), {rounds} alternating rounds; medians over log intervals; "
             f"ours: optim.fused (torch's fused AdamW kernel, the default); {loads.note()}")
    rows = [
        row("pretrain", "train samples/s (steady)", ours_sps, peer_sps, "open_clip_train", "samples/s", True, notes,
            rounds=loads),
        row("pretrain", "train samples/s (steady), optim.fused false", unfused_sps, peer_sps, "open_clip_train",
            "samples/s", True, "the same run with torch's default AdamW (per-tensor on CPU, as open_clip_train's): "
            "what the data path and the loop give without the fused optimizer", rounds=loads),
        row("pretrain", f"wall seconds, {epochs} epochs incl. startup", ours_wall, peer_wall, "open_clip_train", "s",
            False, "clipdense wall includes building the model to read its preprocess config and Ray Data startup",
            rounds=loads),
        row("pretrain", "tokenise one batch in the worker / step time", tok_s / step_s, None, "", "fraction", False,
            f"{tok_s * 1e3:.1f} ms per batch of {batch} vs {step_s * 1e3:.0f} ms per step: tokenising 1-2 captions "
            "per sample in the worker costs less than tokenising all N+1 in Ray Data"),
    ]
    path = save("pretrain_vs_open_clip", rows)
    md = "# clipdense pretrain vs open_clip_train\n\n" + (__doc__ or "").strip() + "\n\n" + markdown(
        [json.loads(path.read_text())])
    path.with_suffix(".md").write_text(md)
    print(md)
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    main(quick=a.quick, images=a.images, batch=a.batch, threads=a.threads, rounds=a.rounds, epochs=a.epochs)
