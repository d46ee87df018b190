"""GPU benchmarks (`python -m bench.run --gpu`), each against a peer measured in the same run where one exists.

  * pretrain (ViT-B-16, MobileCLIP-S2): samples/s of the one runner (`fit_local`, a `ClipPretrainTask` fed
    synthetic batches already on the device, bf16 autocast) vs `python -m open_clip_train.main --dataset-type
    synthetic` on the same model and batch (the peer runs first, on a free GPU); MFU (FLOPs of one fwd+bwd counted
    with torch.utils.flop_counter, over the H100 dense bf16 peak 989 TFLOP/s), peak memory, data-wait fraction,
    and the runner with torch.compile.
  * recaption: CoCa ViT-L-14 captions/s through the coca engine's own top-p sampler (random init with a N(0, 2)
    vocabulary projection as a trained model's peaked logits, fixed length 30, 5 captions per image, bf16).
  * finetune: UperNet ViT-B/16 steps/s at 512x512, batch 8, through the dense task vs a plain loop
    (bench/finetune_step.py).
  * data: images/s and data-wait fraction of a ViT-B-16 training step fed real JPEGs (photo-size and 320x240)
    decoded on the CPU (`data.decode_on: cpu`) vs on the GPU (`data.decode_on: gpu`, nvJPEG; bench/gpu_data.py).
Nothing here imports Ray (the GPU box has none). Without CUDA, or with --quick, every part runs with tiny models
(clip-tiny, coca-tiny) and a few steps on CPU: a smoke test of the plumbing, not a measurement.

    python -m bench.gpu [--quick] [--models ViT-B-16 MobileCLIP-S2] [--batch 256] [--steps 40] [--skip coca ...]
Writes bench/results/<name>.json (name: $BENCH_NAME, else gpu; smoke runs: bench/results/tmp/) and a copy under $OUT.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.common import RESULTS, load_note, median_rate, row, write_report
from bench.finetune_step import compare
from bench.geometry import model_geometry
from bench.gpu_data import data_rows
from clipdense.config import build_config, configs_dir
from clipdense.models import create_clip
from clipdense.pretrain import PretrainConfig
from clipdense.pretrain.losses import build_loss
from clipdense.pretrain.model import build_model
from clipdense.pretrain.task import ClipPretrainTask
from clipdense.recaption.engines.coca import CocaCaptioner
from clipdense.train import TrainConfig, fit_local

H100_BF16_PEAK = 989e12
# open_clip_train with our tiny configs registered (it has no flag for a model config file)
PEER_WRAPPER = ("import sys, open_clip; from open_clip_train.main import main; "
                "open_clip.add_model_config(sys.argv[1]); main(sys.argv[2:])")


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def flops_per_sample(name: str, batch: int, device: torch.device) -> float:
    """FLOPs of one forward + backward (model + contrastive loss), per sample, counted by FlopCounterMode."""
    size, ctx = model_geometry(name)
    m = create_clip(name, output_dict=True).to(device)
    loss_fn = build_loss("clip", 0, 1)
    img = torch.randn(batch, 3, size, size, device=device)
    txt = torch.randint(1, 49000, (batch, ctx), device=device)
    with FlopCounterMode(display=False) as fc:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = m(img, txt)
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
    del m, out, loss
    _free()
    return float(fc.get_total_flops()) / batch


def ours_pretrain(name: str, batch: int, steps: int, log_every: int, compile_: bool) -> dict:
    """The runner on synthetic batches already on the device: samples/s per interval, peak memory, data wait."""
    size, ctx_len = model_geometry(name)

    class SyntheticBatches(ClipPretrainTask):
        def train_batches(self, c):
            g = torch.Generator(device=c.device).manual_seed(c.epoch)
            pool = [{"image": torch.randn(batch, 3, size, size, device=c.device, generator=g),
                     "texts": [torch.randint(1, 49000, (batch, ctx_len), device=c.device, generator=g)]}
                    for _ in range(4)]
            return (pool[i % len(pool)] for i in range(c.start_batch, steps))

    def task():
        cfg = build_config(PretrainConfig, {"model": {"name": name}, "data": {"shards": "unused", "batch_size": batch},
                                            "ray": {"in_process": True}})
        return SyntheticBatches(cfg, build_model(cfg.model, cfg.loss, cfg.train.seed))

    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as d:
        cfg = build_config(TrainConfig, {
            "out_dir": d, "schedule": {"total_steps": steps, "warmup_steps": 2}, "log_every": log_every,
            "scaling": {"use_gpu": cuda, "precision": "auto", "compile": compile_}, "checkpoint": {"every_steps": 0},
            "optim": {"lr": 1e-3, "betas": [0.9, 0.95]}})
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        fit_local(task, cfg)
        logs = [json.loads(x) for x in open(f"{d}/metrics.jsonl") if '"samples_per_s"' in x]
    steady = logs[1:] if len(logs) > 1 else logs  # the first interval holds warm-up / compilation
    out = {"samples_per_s": median_rate([r["samples_per_s"] for r in logs]),
           "data_wait": sum(r.get("data_wait_frac", 0.0) for r in steady) / len(steady),
           "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
           "intervals": [round(r["samples_per_s"], 1) for r in logs]}
    if compile_:
        torch._dynamo.reset()  # compiled code holds the model: free it before the next model's peer runs
    _free()
    return out


def peer_pretrain(name: str, batch: int, steps: int, log_every: int, workers: int) -> dict:
    """open_clip_train.main itself on its synthetic dataset (amp_bf16 on CUDA, fp32 on CPU), one process."""
    _free()  # the subprocess needs what this process's allocator caches
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="bench-gpu-peer-") as d:
        cmd = [sys.executable, "-c", PEER_WRAPPER, str(configs_dir() / "models"),
               "--dataset-type", "synthetic", "--train-num-samples", str(batch * steps), "--model", name,
               "--batch-size", str(batch), "--epochs", "1", "--workers", str(workers),
               "--precision", "amp_bf16" if cuda else "fp32", "--device", "cuda" if cuda else "cpu",
               "--lr", "1e-3", "--beta2", "0.95", "--warmup", "2", "--wd", "0.2", "--grad-clip-norm", "1.0",
               "--log-every-n-steps", str(log_every), "--logs", d, "--report-to", "", "--save-frequency", "0",
               "--zeroshot-frequency", "0", "--val-frequency", "0"]
        env = {**os.environ} if cuda else {**os.environ, "CUDA_VISIBLE_DEVICES": "",
                                           "OMP_NUM_THREADS": str(torch.get_num_threads())}
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env)
        text = p.stdout + p.stderr
    rates = [float(x) for x in re.findall(r"([\d.]+)/s/gpu", text)]
    if p.returncode != 0 or not rates:
        raise RuntimeError(f"open_clip_train rc {p.returncode}, no rate: {text.strip()[-600:]}")
    return {"samples_per_s": median_rate(rates), "wall_s": time.perf_counter() - t0, "intervals": rates}


def pretrain_rows(name: str, batch: int, steps: int, log_every: int, workers: int, compile_: bool) -> list[dict]:
    cuda = torch.cuda.is_available()
    p = peer_pretrain(name, batch, steps, log_every, workers)
    o = ours_pretrain(name, batch, steps, log_every, False)
    prec = "bf16 autocast" if cuda else "fp32 CPU"
    peer_name = f"open_clip_train.main (synthetic, {'amp_bf16' if cuda else 'fp32'})"
    note = (f"batch {batch}, {steps} steps, {prec}; median of {log_every}-step intervals after the first; eager; "
            f"ours {o['intervals']}, peer {p['intervals']}")
    rows = [row("gpu-pretrain", f"{name} samples/s", o["samples_per_s"], p["samples_per_s"], peer_name,
                "samples/s", notes=note),
            row("gpu-pretrain", f"{name} data wait", 100 * o["data_wait"], None, "", "% of step time")]
    if cuda:
        fps = flops_per_sample(name, min(batch, 32), torch.device("cuda"))
        rows += [row("gpu-pretrain", f"{name} MFU", 100 * fps * o["samples_per_s"] / H100_BF16_PEAK, None, "",
                     "% of 989 TFLOP/s", notes=f"{fps / 1e9:.1f} GFLOP per sample (fwd+bwd, counted)"),
                 row("gpu-pretrain", f"{name} peak memory", o["peak_gb"], None, "", "GB")]
        if compile_:
            oc = ours_pretrain(name, batch, steps, log_every, True)
            rows.append(row("gpu-pretrain", f"{name} samples/s (torch.compile)", oc["samples_per_s"],
                            p["samples_per_s"], peer_name + ", eager", "samples/s",
                            notes=f"MFU {100 * fps * oc['samples_per_s'] / H100_BF16_PEAK:.1f}%, peak "
                                  f"{oc['peak_gb']:.1f} GB; intervals {oc['intervals']}"))
    return rows


def coca_rows(model: str, images: int, n: int = 5, seq_len: int = 30, reps: int = 3) -> list[dict]:
    cap = CocaCaptioner(model, seq_len=seq_len, min_seq_len=seq_len, top_p=0.9, device="auto")
    torch.manual_seed(0)
    torch.nn.init.normal_(cap.model.text_decoder.text_projection, std=2.0)  # peaked logits, as a trained model
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (cap.image_size, cap.image_size, 3), dtype=np.uint8) for _ in range(images)]

    def rate(cached: bool) -> float:
        cap.kv_cache = cached
        cap.generate(imgs[: max(1, images // 8)], n)  # warm-up
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            out = cap.generate(imgs, n)
        sync()
        assert len(out) == images and all(len(c) == n for c in out)
        return reps * images * n / (time.perf_counter() - t0)

    sync = torch.cuda.synchronize if cap.device.type == "cuda" else (lambda: None)
    cached_ok = cap.kv_cache
    ours, peer = (rate(True) if cached_ok else None), rate(False)
    cap.close()
    _free()
    prec = "bf16" if cap.device.type == "cuda" else "fp32 CPU"
    note = (f"{images} images x {n} captions x {seq_len} tokens (fixed length), top-p 0.9, {prec}, random init; "
            f"ours: key/value-cached decoder; peer: open_clip's CoCa forward over the whole prefix per token")
    if not cached_ok:
        note += "; model not supported by the cached decoder"
    return [row("gpu-recaption", f"{model} captions/s", ours or peer, peer if ours else None,
                "open_clip CoCa forward per token", "captions/s", notes=note)]


def finetune_rows(backbone: str, size: int, batch: int, steps: int) -> list[dict]:
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    big = backbone != "clip-tiny"
    r = compare(backbone, size, batch, 150 if big else 16, 768 if big else 64, 256 if big else 32, steps, 5, 1, dev)
    peak = f"; peak memory ours {r['ours_gb']:.1f} GB, plain {r['plain_gb']:.1f} GB" if r["ours_gb"] else ""
    return [row("gpu-finetune", f"UperNet {backbone} {size}px steps/s", 1 / r["ours_step_s"], 1 / r["plain_step_s"],
                "plain PyTorch loop", "steps/s",
                notes=f"batch {batch}, {'bf16 autocast' if dev.type == 'cuda' else 'fp32 CPU'}, {steps} steps, "
                      f"median of 5-step intervals after the first{peak}")]


def _guarded(label: str, fn, *args) -> list[dict]:
    """One sub-benchmark; a failure becomes a row (so the others still count)."""
    try:
        rows = fn(*args)
    except Exception as e:
        traceback.print_exc()
        rows = [row(label.split()[0], f"{label} FAILED", None, None, "", "",
                    notes=f"{type(e).__name__}: {' '.join(str(e).split())[:400]}")]
    for r in rows:
        print(json.dumps(r), flush=True)
    return rows


def main(quick: bool = False, argv: list[str] | None = None, out_dir: Path | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu")
    ap.add_argument("--models", nargs="*", default=["ViT-B-16", "MobileCLIP-S2"])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--peer-workers", type=int, default=8)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--skip", nargs="*", default=[], choices=["pretrain", "coca", "finetune", "data"])
    ap.add_argument("--data-workers", type=int, default=8, help="CPU decode threads of the data part's cpu path")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv or [])
    cuda = torch.cuda.is_available()
    small = quick or a.quick or not cuda
    if small:  # tiny models, a few steps: proves the plumbing (on CPU: not a measurement)
        models, batch, steps, log_every, workers = ["clip-tiny"], 8, 6, 2, 1
        coca, images, ft = "coca-tiny", 4, ("clip-tiny", 64, 2, 15)
        data = ("clip-tiny", 8, 4, 2, (640, 480), 16)
    else:
        models, batch, steps, log_every, workers = a.models, a.batch, a.steps, 10, a.peer_workers
        coca, images, ft = "coca_ViT-L-14", 64, ("ViT-B-16", 512, 8, 30)
        data = ("ViT-B-16", a.batch, a.steps, a.data_workers, (1600, 1200), 2 * a.batch)
    rows: list[dict] = []
    if "pretrain" not in a.skip:
        for name in models:
            rows += _guarded(f"gpu-pretrain {name}", pretrain_rows, name, batch, steps, log_every, workers,
                             cuda and not a.no_compile)
    if "coca" not in a.skip:
        rows += _guarded(f"gpu-recaption {coca}", coca_rows, coca, images)
    if "finetune" not in a.skip:
        rows += _guarded("gpu-finetune UperNet", finetune_rows, *ft)
    if "data" not in a.skip:
        rows += _guarded(f"gpu-data {data[0]}", data_rows, *data)
    for r in rows:
        r["notes"] = f"{r['notes']}; {load_note()}".lstrip("; ")
    name = os.environ.get("BENCH_NAME") or "gpu"
    # a smoke run is no measurement: it stays out of the results table (bench/results/tmp is git-ignored)
    print(write_report(name, "GPU benchmarks", __doc__, rows, out_dir or (RESULTS / "tmp" if small else RESULTS)))
    if os.environ.get("OUT"):
        write_report(name, "GPU benchmarks", __doc__, rows, Path(os.environ["OUT"]))
    return rows


if __name__ == "__main__":
    main(argv=sys.argv[1:])
