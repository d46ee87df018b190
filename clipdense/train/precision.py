"""What `precision: auto` means, for the runner and the CoCa captioner: bf16 autocast on CUDA; on a CPU, bf16 only
where it measured faster (bench/bf16_cpu.py), else fp32.

On a CPU, bf16 pays when the CPU computes bf16 natively (AVX-512 BF16 or AMX: the `avx512_bf16` / `amx_bf16` flags
of /proc/cpuinfo; without them oneDNN emulates bf16 and it is slower) and the model's matmuls are wide enough that
their speed-up outweighs autocast's casts. With attention on the math kernel (below), one thread of an AVX-512 BF16
EPYC ran a clip-demo step (width 128) 1.58x faster in bf16 and a clip-tiny step (width 64) 1.25x
(bench/results/bf16_cpu.md; with CPU flash attention they were 1.10x and 0.83x). `auto` picks bf16 on such a CPU
for models whose typical linear layer is at least `BF16_CPU_MIN_WIDTH` wide, and fp32 otherwise (the threshold
predates the math kernel; clip-tiny stays fp32 under `auto` until the quick demo is measured in bf16). `fp32` or
`bf16` are taken as given; `CLIPDENSE_CPU_BF16=0` keeps `auto` at fp32 on CPUs (`=1`: bf16 on any CPU, whatever
its flags and the model).

`autocast(device, precision)` is the one autocast scope of training and captioning. In bf16 on a CPU it also routes
attention to PyTorch's math kernel (matmuls + softmax): the CPU flash-attention kernel's bf16 backward is several
times slower than its fp32 one, while bf16 matmuls run at twice the fp32 rate (bench/results/bf16_cpu.md).
"""
from __future__ import annotations

import contextlib
import os
import statistics
from functools import lru_cache
from typing import Iterator, Literal

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

Precision = Literal["fp32", "bf16"]
CPU_BF16_ENV = "CLIPDENSE_CPU_BF16"
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
BF16_CPU_MIN_WIDTH = 128


@lru_cache(maxsize=None)
def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The first CPU's feature flags (empty where /proc/cpuinfo is missing: not Linux)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX)."""
    return any(f in cpu_flags() for f in BF16_CPU_FLAGS)


def model_width(model: nn.Module | None) -> int | None:
    """The typical matmul width of a model: the median over its linear layers of their narrower side (None: no
    model, or no linear layer)."""
    if model is None:
        return None
    sides = [min(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]
    return int(statistics.median(sides)) if sides else None


def cpu_bf16_pays(model: nn.Module | None = None, *, measured_faster: bool = True) -> bool:
    """Whether `auto` picks bf16 on this CPU for `model` (None: the CPU alone decides); `measured_faster` False for
    work where bf16 measured slower even on a native-bf16 CPU (the CoCa sampler): then only the env var forces it."""
    forced = os.environ.get(CPU_BF16_ENV, "").strip().lower()
    if forced in ("0", "false", "no", "off"):
        return False
    if forced in ("1", "true", "yes", "on"):
        return True
    if not measured_faster or not cpu_has_native_bf16():
        return False
    width = model_width(model)
    return width is None or width >= BF16_CPU_MIN_WIDTH


def resolve_precision(precision: str, device: torch.device | str, model: nn.Module | None = None, *,
                      cpu_measured_faster: bool = True) -> Precision:
    """`fp32` / `bf16` as given; `auto`: bf16 on CUDA, on a CPU where `cpu_bf16_pays`, else fp32."""
    if precision in ("fp32", "bf16"):
        return precision  # type: ignore[return-value]
    if precision != "auto":
        raise ValueError(f"unknown precision {precision!r} (auto, fp32 or bf16)")
    kind = torch.device(device).type
    if kind == "cuda":
        return "bf16"
    return "bf16" if kind == "cpu" and cpu_bf16_pays(model, measured_faster=cpu_measured_faster) else "fp32"


def autocast_dtype(precision: Precision) -> torch.dtype | None:
    """The autocast dtype of a resolved precision (None: no autocast)."""
    return torch.bfloat16 if precision == "bf16" else None


@contextlib.contextmanager
def autocast(device: torch.device | str, precision: Precision) -> Iterator[None]:
    """The scope a forward (and so its backward) runs in at a resolved precision: nothing in fp32; bf16 autocast,
    and on a CPU attention by the math kernel."""
    if precision != "bf16":
        yield
        return
    kind = torch.device(device).type
    with torch.autocast(device_type=kind, dtype=torch.bfloat16), \
            (sdpa_kernel(SDPBackend.MATH) if kind == "cpu" else contextlib.nullcontext()):
        yield
