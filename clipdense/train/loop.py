"""The per-worker training loop, independent of where it runs: `runner` gives it a Ray Train env or a local one.

Order of events per step is fixed (lr set -> forward/loss -> backward -> clip -> step -> counters), and the data
position (epoch, batch within epoch) is checkpointed with the weights, so a resumed run replays nothing and skips
nothing: on CPU with a fixed seed it ends bit-identical to an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from clipdense.config import DataError
from clipdense.train.config import TrainConfig
from clipdense.train.schedule import lr_factor, set_lr
from clipdense.train.state import rng_state, save_checkpoint, seed_everything, set_rng_state, unwrap
from clipdense.train.task import TrainContext, TrainTask
from clipdense.train.tracking import RunWatchers, TrackingConfig


def _autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    p = cfg.scaling.precision
    if p == "bf16" or (p == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


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


def _run_worker(env, task_factory, cfg: TrainConfig, run_id: str, tracking, params, relay) -> dict:
    seed_everything(cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
    device = env.device
    out_dir = Path(cfg.out_dir)
    total = cfg.schedule.total_steps
    ctx = TrainContext(rank=env.rank, world_size=env.world_size, local_rank=env.local_rank, device=device,
                       seed=cfg.seed, total_steps=total, out_dir=out_dir,
                       autocast_dtype=_autocast_dtype(cfg, device), dataset_shards=env.dataset_shards())
    sink = Sink(out_dir, ctx.is_main, run_id)
    task: TrainTask = task_factory()

    resumed = env.load_checkpoint()  # (model_sd, train_state) | None
    step, epoch, batch_in_epoch = 0, 0, 0
    if resumed is not None:
        step, epoch, batch_in_epoch = (resumed[1][k] for k in ("step", "epoch", "batch_in_epoch"))
    ctx.step, ctx.epoch, ctx.start_batch = step, epoch, batch_in_epoch
    sink.watchers = RunWatchers(tracking, out_dir, run_id, total, step, params, ctx.is_main, relay)
    try:
        return _train(env, task_factory, cfg, ctx, sink, task, resumed, step, epoch, batch_in_epoch)
    finally:
        sink.watchers.close()


def _train(env, task_factory, cfg: TrainConfig, ctx: TrainContext, sink: Sink, task: TrainTask, resumed,
           step: int, epoch: int, batch_in_epoch: int) -> dict:
    device, out_dir, total = ctx.device, ctx.out_dir, ctx.total_steps
    task.setup(ctx)
    model = task.build_model()
    if cfg.scaling.grad_checkpointing and hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
    model.to(device)
    groups = task.param_groups(model, cfg.optim)
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                  weight_decay=cfg.optim.weight_decay, fused=cfg.optim.fused or None)
    if resumed is not None:
        model_sd, state = resumed
        unwrap(model).load_state_dict(model_sd)
        optimizer.load_state_dict(state["optimizer"])
        task.load_state_dict(state.get("task", {}))
        rngs = state.get("rng", [])
        if len(rngs) == env.world_size:
            set_rng_state(rngs[env.rank])
        else:  # world size changed (elastic): fresh per-rank streams
            seed_everything(cfg.seed + 1000003 * step + env.rank)
        sink.write({"event": "resume", "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                    "world_size": env.world_size})
    else:
        seed_everything(cfg.seed + env.rank)
    model = env.wrap_model(model, getattr(task, "find_unused_parameters", False))
    if cfg.scaling.compile:
        model = torch.compile(model)
    raw = unwrap(model)

    def autocast():
        if ctx.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=ctx.autocast_dtype)

    def train_state() -> dict:
        rngs = [rng_state()]
        if _dist():
            rngs = [None] * env.world_size
            dist.all_gather_object(rngs, rng_state())
        return {"optimizer": optimizer.state_dict(), "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                "rng": rngs, "task": task.state_dict(), "world_size": env.world_size, "config": cfg.model_dump()}

    def checkpoint(metrics: dict) -> None:
        state = train_state()  # a collective: every rank builds it
        env.report({**metrics, "step": step}, lambda d: save_checkpoint(d, raw, state), step)

    def evaluate() -> dict:
        model.eval()
        with torch.no_grad(), autocast():
            out = task.evaluate(raw, ctx)
        model.train()
        return {f"eval/{k}" if not k.startswith("eval/") else k: float(v) for k, v in out.items()}

    meter = _Meter()
    last: dict = {}
    stopped = False
    model.train()
    while step < total and not stopped:
        ctx.epoch, ctx.start_batch = epoch, batch_in_epoch
        batches = iter(task.train_batches(ctx))
        fresh_epoch, got_any = batch_in_epoch == 0, False
        while step < total:
            t0 = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                break
            wait = time.perf_counter() - t0
            got_any = True
            ctx.step = step
            lr = set_lr(optimizer, cfg.optim.lr, lr_factor(step, cfg.schedule))
            with autocast():
                loss, metrics = task.loss(model, batch, ctx)
            if not torch.isfinite(loss.detach()):
                raise FloatingPointError(f"loss is {loss.item()} at step {step} (epoch {epoch})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip,
                                               foreach=cfg.optim.fused or None)
            optimizer.step()
            step += 1
            batch_in_epoch += 1
            ctx.step = step
            task.after_step(raw, ctx)
            meter.add(loss, metrics, task.batch_size(batch), wait)
            report: dict = {}
            if step % cfg.log_every == 0 or step == total:
                report = {**meter.flush(device, env.world_size), "lr": lr, "step": step, "epoch": epoch}
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total:
                report = {**report, **evaluate(), "step": step, "epoch": epoch}
            if report:
                sink.write(report)
                last.update(report)
            if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 and step < total:
                checkpoint(report)
            elif report:
                env.report(report, None, step)
            if cfg.stop_at_step and step >= cfg.stop_at_step and step < total:
                stopped = True
                break
        else:
            continue  # step == total
        if stopped:
            break
        if not got_any and fresh_epoch:
            raise DataError(f"epoch {epoch} yielded no training batches on rank {env.rank} (too little data "
                            "for the batch size and number of workers?)")
        epoch, batch_in_epoch = epoch + 1, 0

    if stopped:
        sink.write({"event": "stopped", "step": step})
        summary = {"step": step, "epoch": epoch, "stopped_early": True, "metrics": last}
        if ctx.is_main:
            (out_dir / "result.json").write_text(json.dumps(summary, indent=2, default=str))
        return summary
    final = {**evaluate(), "step": step, "epoch": epoch}
    export = {}
    if ctx.is_main:
        cpu_model = raw
        export = task.export(cpu_model, out_dir) or {}
        sink.watchers.artifacts(out_dir / "export")
    final_metrics = {**last, **final}
    sink.write({"event": "final", **final})
    checkpoint(final_metrics)
    summary = {"step": step, "epoch": epoch, "stopped_early": False,
               "metrics": {k: v for k, v in final_metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)},
               "export": export}
    if ctx.is_main:
        (out_dir / "result.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
