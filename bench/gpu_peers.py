"""GPU figures against peers in the same run (no Ray needed: the GPU box lacks it).

  * pretrain: clipdense's runner (fit_local, bf16 autocast, random on-GPU batches) vs `python -m open_clip_train.main
    --dataset-type synthetic` on the same model and batch: samples/s, MFU (FLOPs of one fwd+bwd counted with
    torch.utils.flop_counter / H100 dense bf16 peak 989 TFLOP/s), peak memory, data-wait fraction.
  * CoCa ViT-L-14 captions/s through the recaption engine's own top-p sampler (5 captions/image, 30 tokens).

    python -m bench.gpu_peers [--models ViT-B-16 MobileCLIP-S2] [--batch 256] [--steps 40]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

from bench.common import row, save

H100_BF16_PEAK = 989e12


def _flops_per_step(model_name: str, batch: int, image: int, ctx: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    from clipdense.models import create_clip
    from clipdense.pretrain.task import build_loss

    m = create_clip(model_name, output_dict=True).cuda()
    loss_fn = build_loss("clip", 0, 1)
    img = torch.randn(batch, 3, image, image, device="cuda")
    txt = torch.randint(1, 49000, (batch, ctx), device="cuda")
    with FlopCounterMode(display=False) as fc:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = m(img, txt)
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
    del m
    torch.cuda.empty_cache()
    return float(fc.get_total_flops())


def ours(model_name: str, batch: int, steps: int, compile_: bool) -> dict:
    from clipdense.config import build_config
    from clipdense.models import create_clip
    from clipdense.pretrain.task import ClipPretrainTask
    from clipdense.train import TrainConfig, fit_local

    probe = create_clip(model_name)
    size = probe.visual.preprocess_cfg.get("size", 224) if hasattr(probe.visual, "preprocess_cfg") else 224
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    ctx = int(probe.context_length)
    del probe

    class RandomBatches(ClipPretrainTask):
        def train_batches(self, c):
            g = torch.Generator(device="cuda").manual_seed(c.epoch)
            for _ in range(c.start_batch, 10):
                yield {"image": torch.randn(batch, 3, size, size, device="cuda", generator=g),
                       "texts": [torch.randint(1, 49000, (batch, ctx), device="cuda", generator=g)]}

    def task():
        cfg = {"model": {"name": model_name}, "data": {"shards": "x", "batch_size": batch}, "ray": "off"}
        return RandomBatches(cfg, {"size": size, "mean": (0.5,) * 3, "std": (0.5,) * 3})

    with tempfile.TemporaryDirectory() as d:
        cfg = build_config(TrainConfig, {
            "out_dir": d, "schedule": {"total_steps": steps, "warmup_steps": 2}, "log_every": 10,
            "scaling": {"use_gpu": True, "precision": "auto", "compile": compile_}, "checkpoint": {"every_steps": 0},
            "optim": {"lr": 1e-3, "betas": [0.9, 0.95]}})
        torch.cuda.reset_peak_memory_stats()
        fit_local(task, cfg)
        logs = [json.loads(x) for x in open(f"{d}/metrics.jsonl") if '"loss"' in x]
    steady = logs[1:] or logs  # the first interval holds warm-up / compilation
    sps = sum(l["samples_per_s"] for l in steady) / len(steady)
    wait = sum(l.get("data_wait_frac", 0.0) for l in steady) / len(steady)
    return {"samples_per_s": sps, "peak_gb": torch.cuda.max_memory_allocated() / 1e9, "data_wait": wait,
            "size": size, "ctx": ctx}


def peer(model_name: str, batch: int, steps: int) -> dict:
    """open_clip_train.main itself, synthetic data, amp_bf16, 1 GPU."""
    import gc

    gc.collect()
    torch.cuda.empty_cache()  # the subprocess needs the memory this process's allocator still caches
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "open_clip_train.main", "--dataset-type", "synthetic",
               "--train-num-samples", str(batch * steps), "--model", model_name, "--batch-size", str(batch),
               "--epochs", "1", "--workers", "4", "--precision", "amp_bf16", "--lr", "1e-3", "--beta2", "0.95",
               "--warmup", "2", "--wd", "0.2", "--log-every-n-steps", "10", "--logs", d, "--report-to", "",
               "--save-frequency", "0", "--grad-clip-norm", "1.0"]
        t0 = time.time()
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        text = p.stdout + p.stderr
    rates = [float(x) for x in re.findall(r"([\d.]+)/s/gpu", text)]
    if not rates:
        raise RuntimeError(f"open_clip_train gave no rate (rc {p.returncode}): {text[-1500:]}")
    steady = rates[1:] or rates
    return {"samples_per_s": sum(steady) / len(steady), "wall_s": time.time() - t0}


def coca_captions(batch_images: int = 64, n: int = 5) -> dict:
    import numpy as np
    from PIL import Image

    from clipdense.recaption.engines.coca import CocaCaptioner

    cap = CocaCaptioner("coca_ViT-L-14", seq_len=30, top_p=0.9, device="cuda")
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)) for _ in range(batch_images)]
    cap.generate(imgs[:8], n)  # warm-up
    torch.cuda.synchronize()
    t0 = time.time()
    reps = 3
    for _ in range(reps):
        cap.generate(imgs, n)
    torch.cuda.synchronize()
    dt = time.time() - t0
    return {"images_per_s": reps * batch_images / dt, "captions_per_s": reps * batch_images * n / dt}


def main(quick: bool = False, argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="*", default=["ViT-B-16", "MobileCLIP-S2"])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--skip-coca", action="store_true")
    args = ap.parse_args(argv if argv is not None else [])
    rows = []
    for name in args.models:
        try:
            o = ours(name, args.batch, args.steps, compile_=False)
            p = peer(name, args.batch, args.steps)
            flops = _flops_per_step(name, args.batch, o["size"], o["ctx"])
            mfu = flops / args.batch * o["samples_per_s"] / H100_BF16_PEAK
            note = f"batch {args.batch}, {o['size']}px, bf16 autocast, synthetic batches; eager"
            rows.append(row("gpu-pretrain", f"{name} samples/s", o["samples_per_s"], p["samples_per_s"],
                            "open_clip_train.main (synthetic, amp_bf16)", "samples/s", notes=note))
            rows.append(row("gpu-pretrain", f"{name} MFU", 100 * mfu, None, "", "% of 989 TFLOP/s",
                            notes=f"{flops / args.batch / 1e9:.1f} GFLOP per sample (fwd+bwd, counted)"))
            rows.append(row("gpu-pretrain", f"{name} peak memory", o["peak_gb"], None, "", "GB"))
            rows.append(row("gpu-pretrain", f"{name} data wait", 100 * o["data_wait"], None, "", "% of step"))
            oc = ours(name, args.batch, args.steps, compile_=True)
            rows.append(row("gpu-pretrain", f"{name} samples/s (torch.compile)", oc["samples_per_s"],
                            p["samples_per_s"], "open_clip_train.main (synthetic, amp_bf16, eager)", "samples/s",
                            notes=f"MFU {100 * flops / args.batch * oc['samples_per_s'] / H100_BF16_PEAK:.1f}%"))
        except Exception as e:  # keep the other figures
            rows.append(row("gpu-pretrain", f"{name} FAILED", 0.0, None, "", "", notes=str(e)[:300]))
        print(json.dumps(rows[-1]), flush=True)
    if not args.skip_coca:
        try:
            c = coca_captions()
            rows.append(row("gpu-recaption", "coca_ViT-L-14 captions/s", c["captions_per_s"], None, "",
                            "captions/s", notes=f"{c['images_per_s']:.1f} images/s; 5 captions x 30 tokens, top-p "
                                                "0.9, bf16, random init (fixed length)"))
        except Exception as e:
            rows.append(row("gpu-recaption", "coca FAILED", 0.0, None, "", "", notes=str(e)[:300]))
    out = os.environ.get("OUT")
    name = os.environ.get("BENCH_NAME", "gpu_peers")
    save(name, rows)
    if out:
        save(name, rows, out_dir=__import__("pathlib").Path(out))
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main(argv=sys.argv[1:])
