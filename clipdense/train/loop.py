"""The per-worker training loop, independent of where it runs: `runner` gives it a Ray Train env or a local one.

Order of events per step is fixed (lr set -> forward/loss -> backward -> clip -> step -> counters), and the data
position (epoch, batch within epoch) is checkpointed with the weights, so a resumed run replays nothing and skips
nothing: on CPU with a fixed seed it ends bit-identical to an uninterrupted one.
"""
from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from clipdense.config import DataError
from clipdense.train.config import TrainConfig
from clipdense.train.precision import autocast, autocast_dtype, resolve_precision
from clipdense.train.schedule import lr_factor, set_lr
from clipdense.train.state import rng_state, save_checkpoint, set_rng_state, unwrap
from clipdense.train.task import TrainContext, TrainTask
from clipdense.train.tracking import RunWatchers, TrackingConfig


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's RNGs from one seed (state.py saves and restores what they reach)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


_END = object()  # what `next` returns for an exhausted batch iterator


class _Meter:
    """Sums over one log interval; `flush` reduces across ranks (every rank calls it at the same steps)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.steps, self.samples, self.wait, self.t0 = 0, 0, 0.0, time.perf_counter()
        self.loss = None
        self.extra: dict[str, float] = {}

    def add(self, loss: torch.Tensor, metrics: dict, samples: int, wait: float):
        d = loss.detach().float()
        self.loss = d if self.loss is None else self.loss + d
        for k, v in metrics.items():
            self.extra[k] = self.extra.get(k, 0.0) + float(v)
        self.steps += 1
        self.samples += samples
        self.wait += wait

    def flush(self, device, world_size: int) -> dict:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        keys = sorted(self.extra)
        vec = torch.tensor([float(self.loss) if self.loss is not None else 0.0, self.samples, self.wait / elapsed]
                           + [self.extra[k] for k in keys], dtype=torch.float64, device=device)
        if _dist():
            dist.all_reduce(vec)
            vec /= world_size
        n = max(self.steps, 1)
        out = {"loss": vec[0].item() / n, "samples_per_s": vec[1].item() * world_size / elapsed,
               "samples_per_s_per_worker": vec[1].item() / elapsed, "data_wait_frac": vec[2].item()}
        out.update({k: vec[3 + i].item() / n for i, k in enumerate(keys)})
        self.reset()
        return out


class Sink:
    """Rank 0 appends JSON lines to `out_dir/metrics.jsonl` and shows them to the watchers (progress line,
    trackers); the env reports to Ray."""

    def __init__(self, out_dir: Path, is_main: bool, run_id: str, watchers: RunWatchers | None = None):
        self.path, self.is_main, self.run_id = out_dir / "metrics.jsonl", is_main, run_id
        self.watchers = watchers

    def write(self, record: dict) -> None:
        if self.is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps({**record, "run_id": self.run_id, "time": time.time()}) + "\n")
            if self.watchers is not None:
                self.watchers.write(record)


def run_worker(env, task_factory, cfg: TrainConfig, run_id: str, tracking: TrackingConfig | None = None,
               params: dict | None = None, relay=None) -> dict:
    """Train on this worker until `schedule.total_steps` (or `stop_at_step`); returns rank 0's summary.
    `tracking` says how rank 0 shows the run (progress, trackers); `params` (the stage's resolved config) go to
    the trackers; `relay`: the driver's progress queue (Ray Train runs; see train/driver_progress)."""
    # The deterministic flag is process-global (and makes torch.empty fill with NaN): restore it afterwards, or a
    # later run in the same process (fit_local, a reused Ray worker) inherits it.
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(cfg.deterministic or was_deterministic)
    try:
        return _run_worker(env, task_factory, cfg, run_id, tracking, params, relay)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def _context(env, cfg: TrainConfig) -> TrainContext:
    return TrainContext(rank=env.rank, world_size=env.world_size, local_rank=env.local_rank, device=env.device,
                        seed=cfg.seed, total_steps=cfg.schedule.total_steps, out_dir=Path(cfg.out_dir),
                        dataset_shards=env.dataset_shards())  # autocast_dtype: set once the model is built


def _run_worker(env, task_factory, cfg: TrainConfig, run_id: str, tracking, params, relay) -> dict:
    seed_everything(cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
    ctx = _context(env, cfg)
    task: TrainTask = task_factory()
    resumed = env.load_checkpoint()  # (model_sd, train_state) | None
    if resumed is not None:
        ctx.step, ctx.epoch, ctx.start_batch = (resumed[1][k] for k in ("step", "epoch", "batch_in_epoch"))
    watchers = RunWatchers(tracking, ctx.out_dir, run_id, ctx.total_steps, ctx.step, params, ctx.is_main, relay)
    try:
        return WorkerTraining(env, cfg, ctx, task, Sink(ctx.out_dir, ctx.is_main, run_id, watchers)).run(resumed)
    finally:
        watchers.close()


class WorkerTraining:
    """One worker's run of the step loop: the model, its optimizer and the data position (step, epoch, batch within
    the epoch), which start at the resume point that `ctx` holds and are what a checkpoint saves."""

    def __init__(self, env, cfg: TrainConfig, ctx: TrainContext, task: TrainTask, sink: Sink):
        self.env, self.cfg, self.ctx, self.task, self.sink = env, cfg, ctx, task, sink
        self.step, self.epoch, self.batch_in_epoch = ctx.step, ctx.epoch, ctx.start_batch
        self.meter = _Meter()
        self.last: dict = {}  # the latest value of every metric reported

    def run(self, resumed: tuple[dict, dict] | None) -> dict:
        self._build(resumed)
        stopped = self._train()
        return self._stop() if stopped else self._finish()

    # ---- model and optimizer ----
    def _build(self, resumed: tuple[dict, dict] | None) -> None:
        cfg, task = self.cfg, self.task
        task.setup(self.ctx)
        model = task.build_model()
        if cfg.scaling.grad_checkpointing and hasattr(model, "set_grad_checkpointing"):
            model.set_grad_checkpointing(True)
        model.to(self.ctx.device)
        # `auto` depends on the device and, on a CPU, on the model (train/precision.py)
        self.precision = resolve_precision(cfg.scaling.precision, self.ctx.device, model)
        self.ctx.autocast_dtype = autocast_dtype(self.precision)
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(task.param_groups(model, o), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                           weight_decay=o.weight_decay, fused=o.fused or None)
        if resumed is not None:
            self._restore(model, *resumed)
        else:
            seed_everything(cfg.seed + self.env.rank)
        model = self.env.wrap_model(model, getattr(task, "find_unused_parameters", False))
        self.model = torch.compile(model) if cfg.scaling.compile else model
        self.raw = unwrap(self.model)

    def _restore(self, model: torch.nn.Module, model_sd: dict, state: dict) -> None:
        env = self.env
        unwrap(model).load_state_dict(model_sd)
        self.optimizer.load_state_dict(state["optimizer"])
        self.task.load_state_dict(state.get("task", {}))
        rngs = state.get("rng", [])
        if len(rngs) == env.world_size:
            set_rng_state(rngs[env.rank])
        else:  # world size changed (elastic): fresh per-rank streams
            seed_everything(self.cfg.seed + 1000003 * self.step + env.rank)
        self.sink.write({"event": "resume", "step": self.step, "epoch": self.epoch,
                         "batch_in_epoch": self.batch_in_epoch, "world_size": env.world_size})

    def _autocast(self):
        return autocast(self.ctx.device, self.precision)

    # ---- the loop ----
    def _train(self) -> bool:
        """Epochs until `total_steps`; True when `stop_at_step` ended the run early."""
        self.model.train()
        while self.step < self.ctx.total_steps:
            outcome = self._train_epoch()
            if outcome == "stopped":
                return True
            if outcome == "epoch_ended":
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        return False

    def _train_epoch(self) -> str:
        """This epoch's batches from the current position: "epoch_ended", "total_reached" or "stopped"."""
        ctx = self.ctx
        ctx.epoch, ctx.start_batch = self.epoch, self.batch_in_epoch
        batches = iter(self.task.train_batches(ctx))
        fresh_epoch, got_any = self.batch_in_epoch == 0, False
        while self.step < ctx.total_steps:
            t0 = time.perf_counter()
            batch = next(batches, _END)
            if batch is _END:
                if not got_any and fresh_epoch:
                    raise DataError(f"epoch {self.epoch} yielded no training batches on rank {self.env.rank} (too "
                                    "little data for the batch size and number of workers?)")
                return "epoch_ended"
            got_any = True
            self._train_step(batch, time.perf_counter() - t0)
            if self.cfg.stop_at_step and self.cfg.stop_at_step <= self.step < ctx.total_steps:
                return "stopped"
        return "total_reached"

    def _train_step(self, batch, wait: float) -> None:
        """lr set -> forward/loss -> backward -> clip -> step -> counters -> report."""
        cfg, ctx, task = self.cfg, self.ctx, self.task
        ctx.step = self.step
        lr = set_lr(self.optimizer, cfg.optim.lr, lr_factor(self.step, cfg.schedule))
        with self._autocast():
            loss, metrics = task.loss(self.model, batch, ctx)
        if not torch.isfinite(loss.detach()):
            raise FloatingPointError(f"loss is {loss.item()} at step {self.step} (epoch {self.epoch})")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip,
                                           foreach=cfg.optim.fused or None)
        self.optimizer.step()
        self.step += 1
        self.batch_in_epoch += 1
        ctx.step = self.step
        task.after_step(self.raw, ctx)
        self.meter.add(loss, metrics, task.batch_size(batch), wait)
        self._report(lr)

    def _report(self, lr: float) -> None:
        """Every `log_every` steps the interval's metrics, every `eval_every` an evaluation; to metrics.jsonl and Ray,
        with a checkpoint every `checkpoint.every_steps` (the final step's come from `_finish`)."""
        cfg, step, total = self.cfg, self.step, self.ctx.total_steps
        report: dict = {}
        if step % cfg.log_every == 0 or step == total:
            report = {**self.meter.flush(self.ctx.device, self.env.world_size), "lr": lr, "step": step,
                      "epoch": self.epoch}
        if cfg.eval_every and step % cfg.eval_every == 0 and step < total:
            report = {**report, **self._evaluate(), "step": step, "epoch": self.epoch}
        if report:
            self.sink.write(report)
            self.last.update(report)
        if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 and step < total:
            self._checkpoint(report)
        elif report:
            self.env.report(report, None, step)

    def _evaluate(self) -> dict:
        self.model.eval()
        with torch.no_grad(), self._autocast():
            out = self.task.evaluate(self.raw, self.ctx)
        self.model.train()
        return {f"eval/{k}" if not k.startswith("eval/") else k: float(v) for k, v in out.items()}

    # ---- checkpoints and the end ----
    def _train_state(self) -> dict:
        """Everything an exact resume needs; a collective (every rank's RNG state), so every rank builds it."""
        rngs = [rng_state()]
        if _dist():
            rngs = [None] * self.env.world_size
            dist.all_gather_object(rngs, rng_state())
        return {"optimizer": self.optimizer.state_dict(), "step": self.step, "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch, "rng": rngs, "task": self.task.state_dict(),
                "world_size": self.env.world_size, "config": self.cfg.model_dump()}

    def _checkpoint(self, metrics: dict) -> None:
        state = self._train_state()
        self.env.report({**metrics, "step": self.step}, lambda d: save_checkpoint(d, self.raw, state), self.step)

    def _stop(self) -> dict:
        """Ended as if killed at `stop_at_step`: no final evaluation, export or checkpoint."""
        self.sink.write({"event": "stopped", "step": self.step})
        return self._result({"step": self.step, "epoch": self.epoch, "stopped_early": True, "metrics": self.last})

    def _finish(self) -> dict:
        """The final evaluation, rank 0's export and the last checkpoint."""
        final = {**self._evaluate(), "step": self.step, "epoch": self.epoch}
        export = {}
        if self.ctx.is_main:
            export = self.task.export(self.raw, self.ctx.out_dir) or {}
            self.sink.watchers.artifacts(self.ctx.out_dir / "export")
        final_metrics = {**self.last, **final}
        self.sink.write({"event": "final", **final})
        self._checkpoint(final_metrics)
        finite = {k: v for k, v in final_metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        return self._result({"step": self.step, "epoch": self.epoch, "stopped_early": False, "metrics": finite,
                             "export": export})

    def _result(self, summary: dict) -> dict:
        summary = {**summary, "precision": self.precision}  # `auto` resolved: what the steps computed in
        if self.ctx.is_main:
            (self.ctx.out_dir / "result.json").write_text(json.dumps(summary, indent=2, default=str))
        return summary
