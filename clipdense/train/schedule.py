"""Learning-rate schedules as pure functions of the step (so resuming needs only the step, not scheduler state)."""
from __future__ import annotations

import math

from clipdense.train.config import ScheduleConfig


def lr_factor(step: int, sched: ScheduleConfig) -> float:
    """Multiplier on the base lr for optimizer step `step` (0-based): linear warmup, then cosine / poly / constant.

    Warmup follows open_clip (`(step + 1) / warmup`); the decay reaches `min_lr_ratio` at `total_steps`.
    """
    if step < sched.warmup_steps:
        return (step + 1) / sched.warmup_steps
    if sched.kind == "constant":
        return 1.0
    span = max(1, sched.total_steps - sched.warmup_steps)
    frac = min(1.0, (step - sched.warmup_steps) / span)
    if sched.kind == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * frac))
    else:  # poly
        decay = (1.0 - frac) ** sched.power
    return sched.min_lr_ratio + (1.0 - sched.min_lr_ratio) * decay


def set_lr(optimizer, base_lr: float, factor: float) -> float:
    """Set every group's lr to base_lr * factor * group["lr_scale"] (layer-wise decay lives in lr_scale)."""
    for g in optimizer.param_groups:
        g["lr"] = base_lr * factor * g.get("lr_scale", 1.0)
    return base_lr * factor
