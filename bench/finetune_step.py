"""Dense finetune step time: the UperNet seg task through the one runner (`fit_local`) vs a plain PyTorch loop.

    python -m bench.finetune_step [--backbone clip-tiny] [--size 128] [--batch 8] [--steps 30] [--quick]

Both sides train the same model (`clipdense.dense` builders: ViT pyramid + UperNet + auxiliary FCN, random init,
same seed) on one fixed synthetic batch (images + labels with some ignored pixels) that lives on the device.
Ours: `DenseTask` (its build_model, layer-decay param groups, seg loss) run by `clipdense.train.fit_local`, with only
the data swapped for the fixed batch. Peer: model(x) -> 2 cross-entropies -> zero_grad/backward -> AdamW over
`model.parameters()`. Step time per log interval (wall time / steps, a device sync at each interval's end), median
after the first interval; the two alternate on a shared machine. bf16 autocast on CUDA, fp32 on CPU.
Also imported by bench/gpu.py (UperNet ViT-B/16 at 512 px). No Ray is imported.
"""
from __future__ import annotations

import gc
import json
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from bench.common import RoundLoads, median_rate, parse_bench_args, row, write_report
from clipdense.config import build_config
from clipdense.dense import FinetuneConfig
from clipdense.dense.backbones import create_backbone
from clipdense.dense.heads import resize
from clipdense.dense.task import DenseTask
from clipdense.dense.tasks.seg.head import SegModel
from clipdense.train import fit_local


def seg_config(backbone: str, size: int, batch: int, classes: int, channels: int, aux_channels: int,
               steps: int, log_every: int, out_dir: str, use_gpu: bool):
    return build_config(FinetuneConfig, {
        "task": "seg", "backbone": {"name": backbone}, "out_dir": out_dir, "ray": {"in_process": True},
        "data": {"root": out_dir, "num_classes": classes, "batch_size": batch, "crop_size": [size, size]},
        "head": {"channels": channels, "aux_channels": aux_channels},
        "train": {"schedule": {"total_steps": steps, "warmup_steps": 2}, "log_every": log_every,
                  "checkpoint": {"every_steps": 0}, "out_dir": out_dir,
                  "scaling": {"use_gpu": use_gpu, "precision": "auto"}}})


def fixed_batch(size: int, batch: int, classes: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (batch, 3, size, size), generator=g, dtype=torch.uint8)
    label = torch.randint(0, classes, (batch, size, size), generator=g)
    label[:, : size // 8] = 255  # some ignored pixels, as ADE's reduce_zero_label leaves
    return {"img": img.to(device), "label": label.to(device)}


def _fixed_batch_task(cfg, batch: dict, steps: int):
    class FixedBatchSegTask(DenseTask):
        """The dense task with its datasets replaced by one fixed batch (everything else unchanged)."""

        def setup(self, ctx):
            self.ctx, self.per_rank = ctx, cfg.data.batch_size
            self.train_set = self.eval_set = None

        def train_batches(self, ctx):
            return (batch for _ in range(ctx.start_batch, steps))

        def evaluate(self, model, ctx):
            return {}

        def export(self, model, out_dir):
            return {}

    return FixedBatchSegTask(cfg)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def runner_step_times(cfg, batch: dict, steps: int) -> dict:
    """Per-interval seconds per step of the dense task under `fit_local` (+ peak memory on CUDA)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    fit_local(lambda: _fixed_batch_task(cfg, batch, steps), cfg.train)
    logs = [json.loads(x) for x in open(f"{cfg.train.out_dir}/metrics.jsonl") if '"samples_per_s"' in x]
    peak = torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None
    return {"step_s": [cfg.data.batch_size / r["samples_per_s"] for r in logs], "peak_gb": peak}


def plain_step_times(cfg, batch: dict, steps: int, device: torch.device) -> dict:
    """The same model and batch in a plain loop: autocast forward, CE + 0.4 aux CE, AdamW."""
    torch.manual_seed(cfg.train.seed)
    h = cfg.head
    backbone = create_backbone(cfg.backbone, cfg.data.crop_size)  # as the runner builds it: table at the crop
    model = SegModel(backbone, cfg.data.num_classes, h.channels, tuple(h.pool_scales),
                     h.dropout, h.aux_channels, aux=True).to(device).train()
    o = cfg.train.optim
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    img, label = batch["img"], batch["label"]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times, every = [], cfg.train.log_every
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = model(img)
            loss = F.cross_entropy(resize(out["seg"], label.shape[-2:]), label, ignore_index=255)
            loss = loss + 0.4 * F.cross_entropy(resize(out["aux"], label.shape[-2:]), label, ignore_index=255)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % every == 0:
            loss.item()
            _sync(device)
            times.append((time.perf_counter() - t0) / every)
            t0 = time.perf_counter()
    peak = torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None
    del model, opt
    return {"step_s": times, "peak_gb": peak}


def compare(backbone: str, size: int, batch_size: int, classes: int, channels: int, aux_channels: int, steps: int,
            log_every: int, rounds: int, device: torch.device, loads: RoundLoads | None = None) -> dict:
    """Median step seconds of ours and the plain loop, alternating `rounds` times."""
    ours, plain, peaks = [], [], {}
    for _ in range(rounds):
        with tempfile.TemporaryDirectory(prefix="bench-finetune-") as d:
            cfg = seg_config(backbone, size, batch_size, classes, channels, aux_channels, steps, log_every, d,
                             device.type == "cuda")
            batch = fixed_batch(size, batch_size, classes, device)
            if loads:
                loads.start_round()
            p = plain_step_times(cfg, batch, steps, device)
            _free()
            if loads:
                loads.start_round()
            o = runner_step_times(cfg, batch, steps)
            _free()
        plain += p["step_s"][1:] if len(p["step_s"]) > 2 else p["step_s"]
        ours += o["step_s"][1:] if len(o["step_s"]) > 2 else o["step_s"]
        peaks = {"ours_gb": o["peak_gb"], "plain_gb": p["peak_gb"]}
    return {"ours_step_s": median_rate(ours, False), "plain_step_s": median_rate(plain, False), **peaks}


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(quick: bool = False, argv: list[str] | None = None) -> list[dict]:
    a = parse_bench_args("python -m bench.finetune_step", argv, quick, backbone="clip-tiny", size=128, batch=8,
                         classes=16, channels=64, steps=30, rounds=2, threads=1)
    if a.quick:
        a.steps, a.rounds = 15, 1  # 3 intervals: the first (warm-up) is dropped
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(a.threads)  # same threads on both sides; oversubscription swings CPU times wildly
    loads = RoundLoads(quick=a.quick)
    r = compare(a.backbone, a.size, a.batch, a.classes, a.channels, a.channels // 2, a.steps, 5, a.rounds, device,
                loads)
    note = (f"{a.backbone} UperNet seg, {a.size}px, batch {a.batch}, {a.classes} classes, head {a.channels} ch, "
            f"{device.type} ({'bf16 autocast' if device.type == 'cuda' else f'fp32, {a.threads} thread(s)'}), "
            f"{a.steps} steps x {a.rounds} alternating rounds, median of 5-step intervals; {loads.note()}")
    rows = [row("finetune", "step time (fit_local + DenseTask)", r["ours_step_s"] * 1e3, r["plain_step_s"] * 1e3,
                "plain PyTorch loop", "ms/step", higher_is_better=False, notes=note, rounds=loads)]
    print(write_report("finetune_step", "Dense finetune step: runner vs plain loop", __doc__, rows))
    return rows


if __name__ == "__main__":
    main(argv=sys.argv[1:])
