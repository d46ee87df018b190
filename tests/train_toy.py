"""A learnable toy task for the runner tests: y = 0.5 * sum(x), batches a pure function of (seed, epoch, rank, i)."""
from __future__ import annotations

import os
import time

import torch
from torch import nn

from clipdense.train import TrainTask


class Toy(TrainTask):
    def __init__(self, n_batches: int = 5, batch_size: int = 8):
        self.n, self.bs = n_batches, batch_size
        self.seen = 0  # task state: checkpointed and restored

    def build_model(self):
        return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))

    def train_batches(self, ctx):
        for i in range(ctx.start_batch, self.n):
            g = torch.Generator().manual_seed(ctx.seed * 1_000_003 + ctx.epoch * 1000 + ctx.rank * 100 + i)
            x = torch.randn(self.bs, 4, generator=g)
            yield {"x": x, "y": x.sum(1, keepdim=True) * 0.5}

    def loss(self, model, batch, ctx):
        self.seen += 1
        noise = torch.randn(()) * 1e-3  # global RNG use: resume must restore RNG state to stay exact
        return nn.functional.mse_loss(model(batch["x"]), batch["y"]) + noise, {"seen": float(self.seen)}

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state):
        self.seen = state["seen"]


class KillableToy(Toy):
    """Rank 1 writes its pid at step `kill_step` (once per out_dir) and waits to be SIGKILLed by the test."""

    kill_step = 6

    def loss(self, model, batch, ctx):
        if ctx.rank == ctx.world_size - 1 and ctx.step == self.kill_step:
            pid_file = ctx.out_dir / "victim.pid"
            if not pid_file.exists():
                pid_file.write_text(str(os.getpid()))
                time.sleep(120)
        return super().loss(model, batch, ctx)
