"""The task plugin interface of the one training runner (`clipdense.train.runner.fit` / `fit_local`).

A stage (pretrain, dense finetune) says *what* to train by subclassing `TrainTask`; the runner owns *how*:
the step loop, AdamW + schedule, precision, DDP, checkpoints with exact resume, metrics, Ray Train wiring.

Lifecycle, on every training worker (rank 0..world_size-1), in this order:
    task = task_factory()                 # a picklable zero-arg callable; it is called inside each worker
    task.setup(ctx)                       # once, before anything else (ctx.step/epoch are the resume point)
    model = task.build_model()            # on CPU; the runner moves it to ctx.device and wraps it in DDP
    groups = task.param_groups(model, optim_cfg)   # -> AdamW
    task.load_state_dict(saved)           # only when resuming
    for each epoch e (starting at the resumed one):
        ctx.epoch = e; ctx.start_batch = batches of e already consumed (0 unless resuming mid-epoch)
        for batch in task.train_batches(ctx):        # must yield the epoch's batches FROM index ctx.start_batch
            ctx.step = optimizer steps done so far
            loss, metrics = task.loss(model, batch, ctx)   # `model` may be DDP-wrapped; call it, don't poke it
            ... backward / clip / step / schedule ...
            task.after_step(unwrap(model), ctx)           # after every optimizer step (e.g. clamp a parameter)
            every eval_every steps: task.evaluate(unwrap(model), ctx)
    task.export(unwrap(model), out_dir)   # rank 0 only, at the end

Rules that keep exact resume exact and distributed runs from hanging:
  * `train_batches` must be deterministic given (seed, epoch, rank, world_size): per-sample randomness
    (augmentation, which synthetic caption is drawn) should be a pure function of (seed, epoch, sample key/index),
    not of global RNG state. A task that cannot seek cheaply can `itertools.islice(all_batches, ctx.start_batch, None)`.
  * Every rank must yield the same number of batches per epoch (DDP and `ray.train.report` are barriers).
  * `loss` may use collectives (e.g. open_clip's ClipLoss gathers features across ranks); `evaluate` may too, but
    then it must do so on every rank. Tasks usually compute eval on rank 0 and return {} elsewhere.
  * Metrics are floats (or things `float()` accepts); the runner averages `loss`-dict metrics over log intervals.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn


@dataclass
class TrainContext:
    """What a task needs to know about where it runs; the runner keeps `epoch`, `start_batch` and `step` current."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    epoch: int = 0
    start_batch: int = 0          # batches of `epoch` already consumed (exact resume); 0 on a fresh epoch
    step: int = 0                 # optimizer steps completed so far (global, identical on every rank)
    total_steps: int = 0
    out_dir: Path = field(default_factory=lambda: Path("."))
    autocast_dtype: torch.dtype | None = None   # torch.bfloat16 when the runner trains in bf16, else None
    # Ray Data iterators by name (`ray.train.get_dataset_shard(name)`); empty in `fit_local` or without datasets.
    dataset_shards: dict[str, Any] = field(default_factory=dict)

    @property
    def dataset_shard(self):
        """The "train" dataset shard (a Ray DataIterator), or None."""
        return self.dataset_shards.get("train")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def default_param_groups(model: nn.Module, weight_decay: float, lr: float | None = None) -> list[dict]:
    """open_clip's split: no weight decay on 1-D params (norms, biases), embeddings' scalars and logit_scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exclude = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exclude else decay).append(p)
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]
    if lr is not None:
        for g in groups:
            g["lr"] = lr
    return [g for g in groups if g["params"]]


class TrainTask:
    """Base class for what the runner trains. Override `build_model`, `train_batches` and `loss`; the rest is optional.

    Per-group `lr_scale` in `param_groups` (e.g. layer-wise lr decay) is honoured by the runner's schedule:
    each group's lr = schedule(step) * base_lr * group.get("lr_scale", 1.0).
    """

    def setup(self, ctx: TrainContext) -> None:
        """Called once per worker before `build_model` (e.g. build tokenizers, eval sets, read ctx.rank).
        The runner keeps this same `ctx` object current (step, epoch), so a task may keep a reference to it."""

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def param_groups(self, model: nn.Module, optim_cfg) -> list[dict]:
        """AdamW parameter groups. Default: open_clip style (no weight decay on 1-D params/biases/logit_scale)."""
        return default_param_groups(model, optim_cfg.weight_decay)

    def train_batches(self, ctx: TrainContext) -> Iterator[Any]:
        """This rank's batches of epoch `ctx.epoch`, starting at batch index `ctx.start_batch`. Ends = epoch ends."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any, ctx: TrainContext) -> tuple[torch.Tensor, dict[str, float]]:
        """(scalar loss to minimise, metrics such as {"logit_scale": ...}). Runs under the runner's autocast."""
        raise NotImplementedError

    def after_step(self, model: nn.Module, ctx: TrainContext) -> None:
        """Called on every rank right after each optimizer step (model unwrapped, `ctx.step` already counts it);
        in-place edits of parameters here (e.g. open_clip's logit-scale clamp) are part of the step."""

    def batch_size(self, batch: Any) -> int:
        """Samples in `batch` on this rank (for samples/s). Default: the length of the first tensor found."""
        items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else [batch]
        for v in items:
            if hasattr(v, "shape") and len(v.shape) > 0:
                return int(v.shape[0])
        return 0

    def evaluate(self, model: nn.Module, ctx: TrainContext) -> dict[str, float]:
        """Held-out metrics, called on every rank every `eval_every` steps and at the end (model unwrapped, eval
        mode)."""
        return {}

    def export(self, model: nn.Module, out_dir: Path) -> dict:
        """Write final artefacts (rank 0 only, model unwrapped, fp32 on CPU); return a JSON-able summary."""
        return {}

    def state_dict(self) -> dict:
        """Task-side state to checkpoint beside model/optimizer (counters, EMA, ...)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
