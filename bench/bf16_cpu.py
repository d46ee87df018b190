"""bf16 vs fp32 on this CPU, same run, same thread count: pretraining step, probe features, CoCa captions, and the
pretraining step's MFU against this CPU's matmul peak measured in the same run.

    python -m bench.bf16_cpu [--threads 1] [--rounds 3] [--steps 16] [--wait-s 300] [--out DIR] [--quick]

  * pretrain step: the one runner (`fit_local`) with the pretrain task and loss (`ClipPretrainTask`, clip loss,
    fused AdamW, grad clip) on synthetic batches already in memory (no data path: the step alone), for clip-demo (the
    default demo's model, batch 128) and clip-tiny (the quick demo's, batch 64), `train.scaling.precision` fp32 vs
    bf16 (autocast). samples/s per log interval, median of the intervals after the first, pooled over the rounds.
  * MFU: FLOPs of one forward + backward of the model and loss, per sample, counted by
    torch.utils.flop_counter.FlopCounterMode, times the step's samples/s, over this CPU's peak: the best of several
    2048 x 2048 x 2048 matmuls at the same thread count, fp32 and bf16, measured in each round (median over rounds).
  * probe features: the frozen image tower of each model as the demo's fitted probe runs it (patch tokens after the
    last 2 blocks, at the synthetic world's 128 px, batches of 16), fp32 vs bf16 autocast: images/s and how far the
    bf16 features are from the fp32 ones (max abs difference, relative to the largest fp32 feature, and the relative
    Frobenius distance). The probe itself computes in fp32 (dense/fit_probe); this measures what bf16 would give.
  * CoCa captioning: the coca engine (coca-tiny, the quick demo's captioner; coca-demo, the default demo's) with
    `precision` fp32 vs bf16, random init with a N(0, 2) vocabulary projection (peaked logits, as a trained model's),
    2 captions per image, top-p 0.9, seq_len 30: images/s and the share of captions that bf16 changes (same seed,
    same keys).
Both precisions alternate within each round (fp32 first, then bf16); `--rounds` rounds (default 3). Rows of a run in
which any round started above the load limit are marked loaded. Writes bench/results/bf16_cpu.json and .md (a
`--quick` smoke run: bench/results/tmp/).
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.common import RESULTS, RoundLoads, load_note, parse_bench_args, row, write_report
from bench.geometry import model_geometry
from clipdense.config import build_config
from clipdense.models import create_clip
from clipdense.models import open_clip_adapter as oca
from clipdense.pretrain import PretrainConfig
from clipdense.pretrain.losses import build_loss
from clipdense.pretrain.model import build_model
from clipdense.pretrain.task import ClipPretrainTask
from clipdense.recaption.engines.coca import CocaCaptioner
from clipdense.train import TrainConfig, fit_local
from clipdense.train.precision import cpu_has_native_bf16, resolve_precision

PRECISIONS = ("fp32", "bf16")
CLIP_BATCH = {"clip-demo": 128, "clip-tiny": 64}     # the default and quick demos' pretraining batches
COCA_FOR = {"clip-demo": "coca-demo", "clip-tiny": "coca-tiny"}
PROBE_PX, PROBE_LAYERS, PROBE_BATCH = 128, 2, 16     # the demo's fitted probe: the world's 128 px, last 2 blocks


class SyntheticBatches(ClipPretrainTask):
    """The pretrain task fed a few fixed random batches (image, one caption slot) from memory."""

    batch, steps, size, ctx_len, vocab = 32, 8, 64, 32, 8000

    def train_batches(self, ctx):
        g = torch.Generator().manual_seed(ctx.epoch)
        pool = [{"image": torch.randn(self.batch, 3, self.size, self.size, generator=g),
                 "texts": [torch.randint(1, self.vocab, (self.batch, self.ctx_len), generator=g)]} for _ in range(2)]
        return (pool[i % len(pool)] for i in range(ctx.start_batch, self.steps))


def step_rates(name: str, batch: int, steps: int, log_every: int, precision: str) -> dict:
    """fit_local of the pretrain task at `precision`: samples/s per log interval and the losses logged."""
    size, ctx_len = model_geometry(name)

    def task():
        cfg = build_config(PretrainConfig, {"model": {"name": name}, "data": {"shards": "unused", "batch_size": batch},
                                            "ray": {"in_process": True}})
        t = SyntheticBatches(cfg, build_model(cfg.model, cfg.loss, cfg.train.seed))
        t.batch, t.steps, t.size, t.ctx_len = batch, steps, size, ctx_len
        t.vocab = min(8000, int(t.model.module.vocab_size))
        return t

    with tempfile.TemporaryDirectory(prefix="bench-bf16-") as d:
        cfg = build_config(TrainConfig, {
            "out_dir": d, "schedule": {"total_steps": steps, "warmup_steps": 2}, "log_every": log_every,
            "scaling": {"precision": precision}, "checkpoint": {"every_steps": 0}, "optim": {"lr": 1e-4}})
        result = fit_local(task, cfg)
        logs = [json.loads(x) for x in open(f"{d}/metrics.jsonl") if '"samples_per_s"' in x]
    assert result["precision"] == precision, result.get("precision")
    rates = [r["samples_per_s"] for r in logs]
    return {"rates": rates[1:] if len(rates) > 1 else rates, "loss": [r["loss"] for r in logs]}


def flops_per_sample(name: str, batch: int = 16) -> float:
    """FLOPs of one forward + backward (model + clip loss), per sample (fp32; autocast changes no FLOP count)."""
    size, ctx_len = model_geometry(name)
    m = create_clip(name, output_dict=True)
    loss_fn = build_loss("clip", 0, 1)
    img = torch.randn(batch, 3, size, size)
    txt = torch.randint(1, 8000, (batch, ctx_len))
    with FlopCounterMode(display=False) as fc:
        out = m(img, txt)
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
    return float(fc.get_total_flops()) / batch


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """FLOP/s of the best of `reps` n x n x n matmuls (after one warm-up) at the current thread count."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def probe_features(name: str, images: torch.Tensor, precision: str) -> tuple[torch.Tensor, float]:
    """(features [N, d, h, w] of the last PROBE_LAYERS blocks, images/s) of the frozen image tower."""
    torch.manual_seed(0)
    vit = create_clip(name).visual.eval().requires_grad_(False)
    depth = len(vit.transformer.resblocks)
    blocks = list(range(max(0, depth - PROBE_LAYERS), depth))
    out = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        oca.vit_block_maps(vit, images[:PROBE_BATCH], blocks)  # warm-up
        t0 = time.perf_counter()
        for s in range(0, len(images), PROBE_BATCH):
            out.append(torch.cat(oca.vit_block_maps(vit, images[s:s + PROBE_BATCH], blocks), 1).float())
        dt = time.perf_counter() - t0
    return torch.cat(out), len(images) / dt


def probe_images(n: int) -> torch.Tensor:
    """n normalised 128 px images with structure (blocks of colour over noise), as the synthetic world's."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, PROBE_PX, PROBE_PX, generator=g) * 0.3
    for i in range(n):
        r, c = (int(v) for v in torch.randint(0, PROBE_PX // 2, (2,), generator=g))
        x[i, :, r:r + PROBE_PX // 2, c:c + PROBE_PX // 2] += torch.rand(3, 1, 1, generator=g)
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073))[:, None, None]
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711))[:, None, None]
    return (x.clamp(0, 1) - mean) / std


def captioner(model: str, precision: str) -> CocaCaptioner:
    torch.manual_seed(0)  # the same weights at both precisions
    cap = CocaCaptioner(model, seq_len=30, min_seq_len=5, top_p=0.9, device="cpu", precision=precision, seed=0)
    torch.manual_seed(1)
    torch.nn.init.normal_(cap.model.text_decoder.text_projection, std=2.0)  # peaked logits, as a trained model
    return cap


def caption_rate(cap: CocaCaptioner, images: list, keys: list[str]) -> tuple[list[list[str]], float]:
    cap.generate(images[:4], 2, keys=keys[:4])  # warm-up
    t0 = time.perf_counter()
    out = cap.generate(images, 2, keys=keys)
    return out, len(images) / (time.perf_counter() - t0)


def ratio_note(values: dict[str, list[float]]) -> str:
    return ", ".join(f"{p} {[round(v, 1) for v in values[p]]}" for p in PRECISIONS)


class Measured:
    """Everything one run measures, per model and precision, over the rounds."""

    def __init__(self, models: list[str]):
        def per():
            return {m: {p: [] for p in PRECISIONS} for m in models}
        self.step, self.loss, self.probe, self.coca = per(), per(), per(), per()
        self.peaks: dict[str, list[float]] = {p: [] for p in PRECISIONS}
        self.feats: dict[str, dict[str, torch.Tensor]] = {m: {} for m in models}
        self.caps: dict[str, dict[str, list]] = {m: {} for m in models}


def measure(args, models: list[str], rounds: int, loads: RoundLoads) -> tuple[Measured, dict, torch.Tensor]:
    """`rounds` rounds; in each the matmul peaks, then per model fp32 then bf16: step, probe, captions."""
    got = Measured(models)
    images = probe_images(args.n_probe)
    rng = np.random.default_rng(0)
    coca_imgs = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(args.n_coca)]
    coca_keys = [f"img{i:05d}" for i in range(args.n_coca)]
    captioners = {m: {p: captioner(COCA_FOR[m], p) for p in PRECISIONS} for m in models}
    for r in range(rounds):
        loads.start_round()
        print(f"round {r + 1}/{rounds}: load {loads.loads[-1]}", flush=True)
        for p, dtype in zip(PRECISIONS, (torch.float32, torch.bfloat16)):
            got.peaks[p].append(matmul_peak(dtype, reps=args.peak_reps))
        for m in models:
            for p in PRECISIONS:
                s = step_rates(m, CLIP_BATCH[m], args.steps, args.log_every, p)
                got.step[m][p] += s["rates"]
                got.loss[m][p].append(s["loss"][-1])
                got.feats[m][p], rate = probe_features(m, images, p)
                got.probe[m][p].append(rate)
                got.caps[m][p], rate = caption_rate(captioners[m][p], coca_imgs, coca_keys)
                got.coca[m][p].append(rate)
            print(f"  {m}: step samples/s fp32 {got.step[m]['fp32'][-1]:.1f} bf16 {got.step[m]['bf16'][-1]:.1f}; "
                  f"probe images/s fp32 {got.probe[m]['fp32'][-1]:.1f} bf16 {got.probe[m]['bf16'][-1]:.1f}; coca "
                  f"images/s fp32 {got.coca[m]['fp32'][-1]:.1f} bf16 {got.coca[m]['bf16'][-1]:.1f}", flush=True)
    return got, captioners, images


def step_rows(got: Measured, m: str, models: list[str], args, peak: dict, where: str, loads: RoundLoads) -> list:
    """The pretraining step's bf16 vs fp32 row and its MFU rows (bench "pretrain" for clip-demo)."""
    med = statistics.median
    sps = {p: med(got.step[m][p]) for p in PRECISIONS}
    fps = flops_per_sample(m)
    auto = resolve_precision("auto", "cpu", create_clip(m))
    beside = "".join(f"; {o}: {med(got.step[o]['bf16']) / med(got.step[o]['fp32']):.2f}x" for o in models if o != m)
    bench = "pretrain" if m == "clip-demo" or args.quick else "bf16-cpu"
    rows = [row(bench, f"pretrain step samples/s (steady), bf16 vs fp32, {m}", sps["bf16"], sps["fp32"],
                "clipdense fp32 (train.scaling.precision fp32)", "samples/s",
                notes=f"fit_local, pretrain task + clip loss + fused AdamW, synthetic batches in memory, batch "
                      f"{CLIP_BATCH[m]}, {args.steps} steps per run, median of {args.log_every}-step intervals after "
                      f"the first over {args.rounds} alternating rounds ({ratio_note(got.step[m])}); final loss fp32 "
                      f"{med(got.loss[m]['fp32']):.4f} bf16 {med(got.loss[m]['bf16']):.4f}; precision auto "
                      f"resolves to {auto} here{beside}; {where}", rounds=loads)]
    for p in PRECISIONS:
        achieved = fps * sps[p]
        rows.append(row(bench, f"MFU, pretrain step {p}, {m}", 100 * achieved / peak[p], None, "",
                        f"% of this CPU's measured {p} matmul peak ({args.threads} thread(s))",
                        notes=f"{fps / 1e9:.3f} GFLOP per sample (fwd+bwd, counted) x {sps[p]:.1f} samples/s = "
                              f"{achieved / 1e9:.1f} GFLOP/s; peak {peak[p] / 1e9:.1f} GFLOP/s (best of 2048^3 "
                              f"matmuls, median over rounds); {where}", rounds=loads))
    return rows


def probe_coca_rows(got: Measured, m: str, captioners: dict, n_images: int, args, where: str,
                    loads: RoundLoads) -> list:
    med = statistics.median
    a, b = got.feats[m]["fp32"], got.feats[m]["bf16"]
    diff = (a - b).abs()
    cm = COCA_FOR[m]
    coca_auto = resolve_precision("auto", "cpu", captioners[m]["fp32"].model)
    flat = [(x, y) for ca, cb in zip(got.caps[m]["fp32"], got.caps[m]["bf16"]) for x, y in zip(ca, cb)]
    changed = sum(x != y for x, y in flat) / max(1, len(flat))
    return [
        row("bf16-cpu", f"probe features images/s, bf16 vs fp32, {m}", med(got.probe[m]["bf16"]),
            med(got.probe[m]["fp32"]), "fp32", "images/s",
            notes=f"frozen {m} image tower, patch tokens after the last {PROBE_LAYERS} blocks at {PROBE_PX} px, "
                  f"batches of {PROBE_BATCH}, {n_images} images ({ratio_note(got.probe[m])}); bf16 vs fp32 features: "
                  f"max abs diff {diff.max():.4f} ({diff.max() / a.abs().max():.4f} of the largest |feature|), "
                  f"relative Frobenius distance {(a - b).norm() / a.norm():.4f}; {where}", rounds=loads),
        row("bf16-cpu", f"CoCa captioning images/s, bf16 vs fp32, {cm}", med(got.coca[m]["bf16"]),
            med(got.coca[m]["fp32"]), "fp32", "images/s",
            notes=f"coca engine, {args.n_coca} images x 2 captions, top-p 0.9, seq_len 30, random init with peaked "
                  f"logits ({ratio_note(got.coca[m])}); bf16 changed {100 * changed:.0f}% of the captions (same seed "
                  f"and keys); precision auto resolves to {coca_auto} here; {where}", rounds=loads)]


def main(quick: bool = False, argv: list[str] | None = None) -> list[dict]:
    args = parse_bench_args("python -m bench.bf16_cpu", argv, quick, threads=1, rounds=3, steps=16, log_every=4,
                            probe_images=64, coca_images=64, wait_s=300.0, out="")
    models = ["clip-tiny"] if args.quick else ["clip-demo", "clip-tiny"]
    if args.quick:
        args.rounds, args.steps, args.log_every, args.n_probe, args.n_coca, args.peak_reps = 1, 6, 2, 16, 8, 2
    else:
        args.n_probe, args.n_coca, args.peak_reps = args.probe_images, args.coca_images, 5
    torch.set_num_threads(args.threads)
    print(f"bench bf16_cpu: {args.threads} thread(s), native bf16: {cpu_has_native_bf16()}; {load_note()}",
          flush=True)
    loads = RoundLoads(timeout_s=args.wait_s, quick=args.quick)  # wait up to wait_s for a quiet machine
    got, captioners, images = measure(args, models, args.rounds, loads)
    peak = {p: statistics.median(got.peaks[p]) for p in PRECISIONS}
    where = f"CPU, {args.threads} torch thread(s); {loads.note()}"
    rows = []
    for m in models:
        rows += step_rows(got, m, models, args, peak, where, loads)
        rows += probe_coca_rows(got, m, captioners, len(images), args, where, loads)
    for p in PRECISIONS:
        rows.append(row("bf16-cpu", f"matmul peak {p}, 2048^3", peak[p] / 1e9, None, "", "GFLOP/s (CPU)",
                        notes=f"best of {args.peak_reps} per round, median over rounds "
                              f"({[round(x / 1e9, 1) for x in got.peaks[p]]}); {where}", rounds=loads))
    out_dir = Path(args.out) if args.out else RESULTS / "tmp" if args.quick else RESULTS
    md = write_report("bf16_cpu", "bf16 vs fp32 on CPU, and the pretraining step's MFU", __doc__, rows, out_dir)
    print(md)
    return rows


if __name__ == "__main__":
    import sys

    main(argv=sys.argv[1:])
