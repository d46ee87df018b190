"""Pretraining throughput: clipdense pretrain vs `python -m open_clip_train.main`, same run, same inputs.

    python -m bench.pretrain_vs_open_clip [--images 1536] [--batch 32] [--threads 1] [--rounds 3] [--epochs 3]
                                          [--quick]

Both train the tiny open_clip model `clip-tiny` (2-layer width-64 ViT and text tower, 64 px) on the same 96 px
JPEG files and captions for 3 epochs (`data.cache` off: every epoch decodes again, as the peer's loader does), fp32
on CPU, one training process, batch 32, each side a fresh interpreter: open_clip_train reads a CSV with 1 data
loader worker; `clipdense pretrain` (`ray.in_process`) reads the same JPEG bytes from webdataset tars with
`data.loader: auto`, which for an in-process run is the local loader (pretrain/local_data.py: decode, crop, caption
choice and tokenisation in 1 DataLoader worker, no Ray). A wall-only side runs ours with `data.loader: ray` (Ray
Data tasks, a local Ray started and stopped by the run).
Both sides run the same recipe: AdamW (lr 1e-3, 10 warmup steps, weight decay 0.2, betas 0.9/0.98, eps 1e-6) and
gradient clipping at norm 1.0 (ours by default; the peer's `--grad-clip-norm`, off by default there). The peer's
betas and eps are given: open_clip_train picks 0.9/0.999 and 1e-8 for a model whose name lacks "vit".
Ours runs its defaults, including torch's fused AdamW (`train.optim.fused`); a third side runs ours with
`optim.fused: false` (torch's default AdamW, as the peer's), which shows the data path's and loop's share without the
optimizer kernel. Throughput is samples/s per log interval (wall time of the interval, data waits included, as
open_clip_train's `Batch (t)`), median after the first; both sides use the same torch thread count and alternate runs
(thread oversubscription on a shared box swings step times tenfold).
A bf16 pair on clip-demo (the default demo's model, width 128: where `auto` picks bf16 on a CPU with native bf16)
trains one epoch of the same JPEGs: ours with `train.scaling.precision: bf16` against `open_clip_train --precision
amp_bf16` (torch.autocast bf16 on the CPU), same batch and threads.
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
import torch
from PIL import Image

from bench.common import RoundLoads, markdown, row, save
from clipdense.config import build_config, configs_dir
from clipdense.models import tokenizer_for
from clipdense.pretrain import PretrainConfig

# ours by default (train.optim.grad_clip); open_clip_train's default is none: the peer gets it too
GRAD_CLIP = 1.0
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


def peer_model_config(root: Path, model: str) -> Path:
    """Our model JSON for open_clip_train, with a shipped BPE file's path made absolute (it opens it as written)."""
    cfg = json.loads((configs_dir() / "models" / f"{model}.json").read_text())
    tok = cfg.get("text_cfg", {}).get("tokenizer_kwargs", {})
    if "bpe_path" in tok:
        tok["bpe_path"] = str((configs_dir() / "models" / tok["bpe_path"]).resolve())
    path = root / f"{model}.json"
    path.write_text(json.dumps(cfg))
    return path


def run_open_clip_train(csv_path: Path, logs: Path, batch: int, steps_log: int, threads: int, epochs: int = 3,
                        model: str = "clip-tiny", precision: str = "fp32") -> tuple[list[float], float]:
    argv = [sys.executable, "-c", OPEN_CLIP_WRAPPER, str(peer_model_config(csv_path.parent, model)),
            "--dataset-type", "csv", "--train-data", str(csv_path), "--csv-img-key", "filepath",
            "--csv-caption-key", "title", "--csv-separator", ",", "--model", model, "--batch-size", str(batch),
            "--epochs", str(epochs), "--workers", "1", "--precision", precision, "--lr", "1e-3", "--warmup", "10",
            "--grad-clip-norm", str(GRAD_CLIP), "--beta2", "0.98", "--eps", "1e-6", "--wd", "0.2",
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


def run_clipdense(tars: list[Path], out: Path, batch: int, steps: int, steps_log: int, threads: int,
                  fused: bool = True, model: str = "clip-tiny", precision: str = "fp32",
                  loader: str = "auto") -> tuple[list[float], float]:
    """`clipdense pretrain` in a fresh interpreter, as the peer runs: its wall includes imports and startup."""
    cfg = build_config(PretrainConfig, {
        "model": {"name": model}, "captions": {"policy": "real"}, "ray": {"in_process": True},
        "data": {"shards": [str(t) for t in tars], "batch_size": batch, "decode_cpus": 1, "count_errors": False,
                 "loader": loader},
        "train": {"out_dir": str(out), "optim": {"lr": 1e-3, "fused": fused, "grad_clip": GRAD_CLIP},
                  "schedule": {"total_steps": steps, "warmup_steps": 10}, "log_every": steps_log,
                  "checkpoint": {"every_steps": 0}, "scaling": {"precision": precision}}})
    out.mkdir(parents=True, exist_ok=True)
    (out / "pretrain.yaml").write_text(cfg.to_yaml())
    argv = [str(Path(sys.executable).with_name("clipdense")), "pretrain", "--config", str(out / "pretrain.yaml")]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(threads)})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"clipdense pretrain failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
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


BF16_MODEL = "clip-demo"   # the default demo's model: bf16 is what `auto` picks for it on a native-bf16 CPU


def steady(sps: list[float]) -> list[float]:
    """A run's interval rates without the first (warm-up) interval."""
    return sps[1:] if len(sps) > 2 else sps


def measure_rounds(n: int, batch: int, steps: int, steps_log: int, threads: int, epochs: int, rounds: int,
                   loads: RoundLoads) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Every side once per round, alternating: (steady interval rates by side, wall seconds by side)."""
    rates: dict[str, list[float]] = {k: [] for k in ("peer", "ours", "ours_ray_data", "unfused", "peer_bf16",
                                                     "ours_bf16")}
    walls: dict[str, list[float]] = {"peer": [], "ours": [], "ours_ray_data": []}
    with tempfile.TemporaryDirectory(prefix="bench-pretrain-") as tmp:
        root = Path(tmp)
        csv_path, tars = make_inputs(root / "data", n)
        bf16_steps = n // batch  # one epoch: the bf16 pair compares steady rates, not startup
        for r in range(rounds):
            loads.start_round()
            got = run_open_clip_train(csv_path, root / f"peer{r}", batch, steps_log, threads, epochs)
            rates["peer"] += steady(got[0])
            walls["peer"].append(got[1])
            loads.start_round()
            got = run_clipdense(tars, root / f"ours{r}", batch, steps, steps_log, threads)
            rates["ours"] += steady(got[0])
            walls["ours"].append(got[1])
            loads.start_round()
            got = run_clipdense(tars, root / f"ours_ray_data{r}", batch, steps, steps_log, threads, loader="ray")
            rates["ours_ray_data"] += steady(got[0])
            walls["ours_ray_data"].append(got[1])
            loads.start_round()
            rates["unfused"] += steady(run_clipdense(tars, root / f"unfused{r}", batch, steps, steps_log, threads,
                                                     fused=False)[0])
            loads.start_round()
            rates["peer_bf16"] += steady(run_open_clip_train(csv_path, root / f"peer_bf16{r}", batch, steps_log,
                                                             threads, 1, BF16_MODEL, "amp_bf16")[0])
            loads.start_round()
            rates["ours_bf16"] += steady(run_clipdense(tars, root / f"ours_bf16{r}", batch, bf16_steps, steps_log,
                                                       threads, model=BF16_MODEL, precision="bf16")[0])
    return rates, walls


def main(quick: bool = False, images: int | None = None, batch: int = 32, threads: int = 1,
         rounds: int | None = None, epochs: int = 3) -> list[dict]:
    n = images or (512 if quick else 1536)
    steps = epochs * (n // batch)  # the same epochs as open_clip_train runs, every one decoded again
    steps_log = 4 if quick else 8
    rounds = rounds or (1 if quick else 3)
    # Same compute threads on both sides: on a small shared box, thread oversubscription swings step times by
    # 10x, so the runs also alternate (peer, ours, peer, ours) and report medians over every interval.
    torch.set_num_threads(threads)
    loads = RoundLoads(quick=quick)
    rates, walls = measure_rounds(n, batch, steps, steps_log, threads, epochs, rounds, loads)
    tok_s = tokenize_cost(batch)
    med = {k: statistics.median(v) for k, v in rates.items()}
    ours_sps, peer_sps, unfused_sps = med["ours"], med["peer"], med["unfused"]
    ours_wall, peer_wall = statistics.median(walls["ours"]), statistics.median(walls["peer"])
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
            False, "both sides: a fresh interpreter (imports, model build, data start, training, final eval and "
            "export for ours); ours: `clipdense pretrain` with ray.in_process, whose rows `data.loader: auto` reads "
            f"in the process and one DataLoader worker (no Ray); runs: ours {walls['ours']}, peer {walls['peer']}",
            rounds=loads),
        row("pretrain", f"wall seconds, {epochs} epochs incl. startup, data.loader ray", statistics.median(
            walls["ours_ray_data"]), peer_wall, "open_clip_train", "s", False,
            "the same run reading its rows through Ray Data (starts a local Ray): what the local loader saves; "
            f"runs: {walls['ours_ray_data']}; its steady rate {med['ours_ray_data']:.0f} samples/s", rounds=loads),
        row("pretrain", f"bf16 train samples/s, steady, {BF16_MODEL}", med["ours_bf16"], med["peer_bf16"],
            "open_clip_train --precision amp_bf16", "samples/s", True,
            f"{BF16_MODEL} 64px, batch {batch}, the same JPEGs, 1 epoch per run, {threads} torch thread(s), "
            f"{rounds} alternating rounds, medians over log intervals; ours: train.scaling.precision bf16 (autocast, "
            f"attention on the math kernel), fused AdamW; the peer: torch.autocast bf16 on CPU; {loads.note()}",
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
