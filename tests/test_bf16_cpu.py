"""bf16 on CPU: what `precision: auto` resolves to, the CoCa engine's captions in bf16, a bf16 pretraining step."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from train_toy import Toy

from clipdense.config import build_config
from clipdense.pretrain import PretrainConfig
from clipdense.pretrain.model import build_model
from clipdense.pretrain.task import ClipPretrainTask
from clipdense.recaption.engines.coca import CocaCaptioner
from clipdense.train import TrainConfig, fit_local
from clipdense.train import precision as prec


def _images(k, size=64):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(k)]


@pytest.fixture
def cpu_flags(monkeypatch):
    """Set the CPU's feature flags the precision rule reads: `cpu_flags(set())` stands in for a CPU without native
    bf16, `cpu_flags({"avx512_bf16"})` for one with it, whatever this machine has."""
    monkeypatch.delenv(prec.CPU_BF16_ENV, raising=False)

    def set_flags(flags):
        monkeypatch.setattr(prec, "cpu_flags", lambda: frozenset(flags))
    return set_flags


def _mlp(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))


def test_auto_is_bf16_exactly_where_the_cpu_has_native_bf16_and_the_model_is_wide(cpu_flags, monkeypatch):
    wide, narrow = _mlp(prec.BF16_CPU_MIN_WIDTH), _mlp(prec.BF16_CPU_MIN_WIDTH // 2)
    for flags, expected in ((set(), "fp32"), ({"avx512_bf16"}, "bf16"), ({"amx_bf16", "amx_tile"}, "bf16"),
                            ({"avx512f", "avx2"}, "fp32")):
        cpu_flags(flags)  # set(), {"avx512f", "avx2"}: a CPU without the flag
        assert prec.cpu_has_native_bf16() == (expected == "bf16")
        assert prec.resolve_precision("auto", "cpu", wide) == expected, flags
        assert prec.resolve_precision("auto", "cpu", narrow) == "fp32"        # slower there: fp32 whatever the CPU
        assert prec.resolve_precision("fp32", "cpu", wide) == "fp32"          # forced
        assert prec.resolve_precision("bf16", "cpu", narrow) == "bf16"
        assert prec.resolve_precision("auto", "cuda", narrow) == "bf16"
    cpu_flags({"avx512_bf16"})
    monkeypatch.setenv(prec.CPU_BF16_ENV, "0")                                # the environment forces fp32
    assert prec.resolve_precision("auto", "cpu", wide) == "fp32"
    cpu_flags(set())
    monkeypatch.setenv(prec.CPU_BF16_ENV, "1")
    assert prec.resolve_precision("auto", "cpu", narrow) == "bf16"
    assert prec.autocast_dtype("bf16") is torch.bfloat16 and prec.autocast_dtype("fp32") is None
    with pytest.raises(ValueError, match="unknown precision"):
        prec.resolve_precision("fp16", "cpu")


class WideToy(Toy):
    def build_model(self):
        return nn.Sequential(nn.Linear(4, 128), *(nn.Linear(128, 128) for _ in range(3)), nn.Linear(128, 1))


def test_the_runner_resolves_auto_with_the_model_and_records_it(cpu_flags, tmp_path):
    def run(task, precision, out):
        cfg = build_config(TrainConfig, {"out_dir": str(tmp_path / out), "schedule": {"total_steps": 2},
                                         "log_every": 1, "scaling": {"precision": precision}})
        result = fit_local(task, cfg)
        assert json.loads((tmp_path / out / "result.json").read_text())["precision"] == result["precision"]
        return result["precision"]

    cpu_flags({"avx512_bf16"})
    assert run(WideToy, "auto", "wide") == "bf16"
    assert run(Toy, "auto", "narrow") == "fp32"
    assert run(WideToy, "fp32", "forced") == "fp32"
    cpu_flags(set())                                 # a CPU without the flag
    assert run(WideToy, "auto", "no-flag") == "fp32"


def test_coca_engine_follows_the_rule_and_captions_in_bf16_as_a_function_of_seed_and_key(cpu_flags, monkeypatch):
    """CPU bf16: a row's captions are the same alone, in a batch, in another order and in another captioner
    instance (another actor)."""
    cpu_flags(set())
    assert CocaCaptioner("coca-tiny", seq_len=12, device="cpu").precision == "fp32"
    monkeypatch.setenv(prec.CPU_BF16_ENV, "1")
    coca = CocaCaptioner("coca-tiny", seq_len=12, device="cpu", seed=3)
    assert coca.precision == "bf16"
    monkeypatch.delenv(prec.CPU_BF16_ENV)
    images, keys = _images(4), ["k0", "k1", "k2", "k3"]
    batch = coca.generate(images, 3, keys=keys)
    alone = [coca.generate([im], 3, keys=[k])[0] for im, k in zip(images, keys)]
    assert batch == alone
    order = [3, 1, 0, 2]
    assert coca.generate([images[i] for i in order], 3, keys=[keys[i] for i in order]) == [batch[i] for i in order]
    other_actor = CocaCaptioner("coca-tiny", seq_len=12, device="cpu", seed=3, precision="bf16")
    other_actor.model.load_state_dict(coca.model.state_dict())
    assert other_actor.generate(images[1:3], 3, keys=keys[1:3]) == batch[1:3]
    assert len({c for caps in batch for c in caps}) > 4


class SyntheticClip(ClipPretrainTask):
    """The pretrain task (clip loss) on two fixed random batches."""

    def train_batches(self, ctx):
        g = torch.Generator().manual_seed(ctx.epoch)
        pool = [{"image": torch.randn(16, 3, 64, 64, generator=g),
                 "texts": [torch.randint(1, 8000, (16, 32), generator=g)]} for _ in range(2)]
        return (pool[i % 2] for i in range(ctx.start_batch, 4))


def test_a_bf16_pretraining_step_on_clip_tiny_stays_close_to_fp32(tmp_path):
    def task():
        cfg = build_config(PretrainConfig, {"model": {"name": "clip-tiny"}, "ray": {"in_process": True},
                                            "data": {"shards": "unused", "batch_size": 16}})
        return SyntheticClip(cfg, build_model(cfg.model, cfg.loss, cfg.train.seed))

    losses = {}
    for p in ("fp32", "bf16"):
        cfg = build_config(TrainConfig, {"out_dir": str(tmp_path / p), "schedule": {"total_steps": 4},
                                         "log_every": 1, "checkpoint": {"every_steps": 0}, "optim": {"lr": 1e-3},
                                         "scaling": {"precision": p}})
        assert fit_local(task, cfg)["precision"] == p
        logs = [json.loads(x) for x in (tmp_path / p / "metrics.jsonl").read_text().splitlines()]
        losses[p] = [r["loss"] for r in logs if "loss" in r]
    assert len(losses["bf16"]) == 4
    assert losses["bf16"] != losses["fp32"]            # bf16 did compute differently
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-2)


def _attention_kernels(precision: str) -> set[str]:
    """The scaled-dot-product kernels a multi-head attention forward + backward calls inside `prec.autocast`."""
    attn = nn.MultiheadAttention(32, 4, batch_first=True)
    x = torch.randn(2, 9, 32, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
        with prec.autocast("cpu", precision):
            out, _ = attn(x, x, x, need_weights=False)
        out.float().sum().backward()
    return {e.key for e in p.key_averages() if "scaled_dot_product" in e.key}


def test_bf16_on_cpu_runs_attention_on_the_math_kernel_not_cpu_flash():
    """CPU flash attention's bf16 backward is several times slower than its fp32 one (bench/results/bf16_cpu.md):
    in bf16 on a CPU attention goes through the math kernel; fp32 keeps PyTorch's choice."""
    fp32, bf16 = _attention_kernels("fp32"), _attention_kernels("bf16")
    assert any("flash" in k for k in fp32), fp32
    assert not any("flash" in k for k in bf16) and any("math" in k for k in bf16), bf16
