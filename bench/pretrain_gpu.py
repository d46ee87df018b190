"""GPU check of the one runner with the pretrain loss (no Ray, no data pipeline): ViT-B-16, batch 256, bf16 autocast,
random batches already on the GPU. Reports fit_local samples/s (eager, grad checkpointing, torch.compile) against a
plain open_clip_train-style loop (autocast, ClipLoss, AdamW, grad clip) on the same batches, and peak memory.

    python bench/pretrain_gpu.py                 # eager + grad checkpointing + plain loop
    COMPILE=1 python bench/pretrain_gpu.py       # fit_local with train.scaling.compile=true
Writes $OUT (default bench/results/tmp)/gpu_pretrain_check.json; bench/results/pretrain_gpu_h100.json holds one run.
"""
import json
import os
import statistics
import sys
import tempfile
import time

import torch
from torch import nn

sys.path.insert(0, os.getcwd())  # run as `python bench/pretrain_gpu.py` from the repository root
from clipdense.config import build_config
from clipdense.models import create_clip
from clipdense.pretrain import PretrainConfig
from clipdense.pretrain.losses import build_loss
from clipdense.pretrain.model import build_model
from clipdense.pretrain.task import ClipPretrainTask
from clipdense.train import TrainConfig, fit_local

OUT = os.environ.get("OUT", "bench/results/tmp")
B, STEPS = int(os.environ.get("B", 256)), int(os.environ.get("STEPS", 30))
COMPILE = os.environ.get("COMPILE") == "1"


class RandomBatches(ClipPretrainTask):
    def train_batches(self, ctx):
        g = torch.Generator(device="cuda").manual_seed(ctx.epoch)
        for _ in range(ctx.start_batch, 10):
            yield {"image": torch.randn(B, 3, 224, 224, device="cuda", generator=g),
                   "texts": [torch.randint(1, 49407, (B, 77), device="cuda", generator=g)]}


def task():
    cfg = build_config(PretrainConfig, {"model": {"name": "ViT-B-16"}, "data": {"shards": "x", "batch_size": B},
                                        "ray": {"in_process": True}})
    return RandomBatches(cfg, build_model(cfg.model, cfg.loss, cfg.train.seed))


def ours(grad_checkpointing: bool) -> dict:
    """fit_local on the random batches: samples/s and loss per log interval, peak memory, the last step."""
    with tempfile.TemporaryDirectory() as d:
        cfg = build_config(TrainConfig, {
            "out_dir": d, "schedule": {"total_steps": STEPS, "warmup_steps": 2}, "log_every": 10,
            "scaling": {"use_gpu": True, "precision": "auto", "grad_checkpointing": grad_checkpointing,
                        "compile": COMPILE},
            "checkpoint": {"every_steps": 0}, "optim": {"lr": 1e-3, "betas": [0.9, 0.95]}})
        torch.cuda.reset_peak_memory_stats()
        r = fit_local(task, cfg)
        logs = [json.loads(x) for x in open(f"{d}/metrics.jsonl") if '"loss"' in x]
    return {"samples_per_s": [round(log["samples_per_s"], 1) for log in logs],
            "loss": [round(log["loss"], 3) for log in logs],
            "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2), "step": r["step"]}


def plain_loop_samples_per_s() -> float:
    """The peer: an open_clip_train-style loop (autocast bf16, ClipLoss, AdamW, clip grad) on the same batches."""
    m = create_clip("ViT-B-16", output_dict=True).cuda()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.2)
    loss_fn = build_loss("clip", 0, 1)
    g = torch.Generator(device="cuda").manual_seed(0)
    batches = [(torch.randn(B, 3, 224, 224, device="cuda", generator=g),
                torch.randint(1, 49407, (B, 77), device="cuda", generator=g)) for _ in range(10)]
    times = []
    for s in range(STEPS):
        img, txt = batches[s % 10]
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = m(img, txt)
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        loss.item()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return round(B / statistics.median(times[5:]), 1)


def write(res: dict, name: str) -> None:
    os.makedirs(OUT, exist_ok=True)
    json.dump(res, open(f"{OUT}/{name}", "w"), indent=1)


def main() -> None:
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "B": B, "steps": STEPS}
    for grad_checkpointing in ((False,) if COMPILE else (False, True)):
        res[f"ours_gc{int(grad_checkpointing)}"] = ours(grad_checkpointing)
        print(res, flush=True)
    if COMPILE:
        write(res, "gpu_compile_check.json")
        return
    res["plain_loop_samples_per_s"] = plain_loop_samples_per_s()
    print(json.dumps(res, indent=1))
    write(res, "gpu_pretrain_check.json")


if __name__ == "__main__":
    main()
