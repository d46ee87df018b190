"""Where the loop runs: `run_training(task_factory, cfg, plan)` picks `fit` (Ray Train V2 TorchTrainer, N workers, fault
tolerant) or `fit_local` (this process) as the stage's `TrainPlan` says.

Both run `loop.run_worker` unchanged; only the environment differs (rank, device, DDP, checkpoints, reporting).
Outputs in `cfg.out_dir`: metrics.jsonl (rank 0), result.json, the task's exports; checkpoints live in
`<checkpoint.storage or out_dir>/<name>/step_*` (Ray; storage may be s3://) or `out_dir/checkpoints/step_*`
(local). Rerunning with the same storage and name resumes from the latest checkpoint at the exact step and data
position (Ray Train restores its checkpoint manager's snapshot from the storage, also on a new cluster).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from clipdense.config import raise_user_error_behind
from clipdense.train.config import TrainConfig
from clipdense.train.driver_progress import driver_progress
from clipdense.train.isolate import isolation_wanted, run_in_driver_host
from clipdense.train.loop import run_worker
from clipdense.train.resize_ticks import coordinator_ticks
from clipdense.train.state import STATE_FILE, load_checkpoint
from clipdense.train.task import TrainTask
from clipdense.train.tracking import TrackingConfig, check_installed

TaskFactory = Callable[[], TrainTask]


@dataclass(frozen=True)
class TrainPlan:
    """Where and how a run trains, resolved by the stage: in this process or on Ray Train workers, what it reads
    (`datasets`: name -> Ray Dataset), how it is shown (`tracking`, and `params`, the resolved stage config the
    trackers record), and for Ray Train runs the callbacks, the run name and the datasets split among the workers in
    a fixed order (`ordered_split`; None: Ray Train's default ingest)."""

    in_process: bool
    datasets: dict | None = None
    tracking: TrackingConfig | None = None
    params: dict | None = None
    callbacks: list | None = None
    name: str | None = None
    ordered_split: tuple[str, ...] | None = None


def run_training(task_factory: TaskFactory, cfg: TrainConfig, plan: TrainPlan) -> dict:
    """The one entry of the runner: `fit_local` or `fit` as `plan` says; the run's summary."""
    if not plan.in_process:
        return fit(task_factory, cfg, datasets=plan.datasets, callbacks=plan.callbacks, name=plan.name,
                   dataset_config=_ordered_ingest(plan.ordered_split), tracking=plan.tracking, params=plan.params)
    return fit_local(task_factory, cfg, datasets=plan.datasets, tracking=plan.tracking, params=plan.params)


def _ordered_ingest(split: tuple[str, ...] | None):
    """Ray Train's ingest with the datasets `split` among workers and the order preserved (deterministic split and
    order: exact resume); None: Ray Train's default."""
    if split is None:
        return None
    from ray.train import DataConfig  # Ray loads only for Ray Train runs: importing the runner needs no Ray

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return DataConfig(datasets_to_split=list(split), execution_options=options)


class LocalCheckpoints:
    """Checkpoints under `root/step_XXXXXXXX/`, written atomically (temp dir + rename), the newest `keep` kept."""

    def __init__(self, root: str | Path, keep: int | None):
        self.root, self.keep = Path(root), keep

    def _all(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        done = [p for p in self.root.glob("step_*") if (p / STATE_FILE).is_file() and not p.name.endswith(".tmp")]
        return sorted(done, key=lambda p: int(p.name.split("_")[1]))

    def latest(self) -> Path | None:
        found = self._all()
        return found[-1] if found else None

    def save(self, step: int, write) -> Path:
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f"step_{step:08d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        write(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if self.keep:
            for old in self._all()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        return final


class LocalEnv:
    """World size 1 in this process; checkpoints under out_dir/checkpoints."""

    rank, world_size, local_rank = 0, 1, 0

    def __init__(self, cfg: TrainConfig, datasets: dict | None):
        use_cuda = cfg.scaling.use_gpu and torch.cuda.is_available()
        self.device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
        self.checkpoints = LocalCheckpoints(Path(cfg.out_dir) / "checkpoints", cfg.checkpoint.keep)
        self._datasets = datasets or {}
        self.last_checkpoint: Path | None = None

    def dataset_shards(self) -> dict:
        return {name: ds.iterator() for name, ds in self._datasets.items()}

    def load_checkpoint(self):
        latest = self.checkpoints.latest()
        return load_checkpoint(latest) if latest else None

    def wrap_model(self, model, find_unused: bool):
        return model

    def report(self, metrics: dict, write_checkpoint, step: int) -> None:
        if write_checkpoint is not None:
            self.last_checkpoint = self.checkpoints.save(step, write_checkpoint)


class RayEnv:
    """Inside a Ray Train worker: rank from the train context, checkpoints through `ray.train.report`."""

    def __init__(self, cfg: TrainConfig, dataset_names: list[str]):
        import ray.train
        import ray.train.torch

        tctx = ray.train.get_context()
        self.rank, self.world_size = tctx.get_world_rank(), tctx.get_world_size()
        self.local_rank = tctx.get_local_rank()
        self.device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        torch.set_num_threads(max(1, round(cfg.scaling.cpus_per_worker)))
        self._names = dataset_names

    def dataset_shards(self) -> dict:
        import ray.train
        return {name: ray.train.get_dataset_shard(name) for name in self._names}

    def load_checkpoint(self):
        import ray.train
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as d:
            return load_checkpoint(d)

    def wrap_model(self, model, find_unused: bool):
        if self.world_size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(model, device_ids=ids, find_unused_parameters=find_unused)

    def report(self, metrics: dict, write_checkpoint, step: int) -> None:
        import ray.train
        from ray.train import Checkpoint

        flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}
        if write_checkpoint is None:
            ray.train.report(flat)
            return
        with tempfile.TemporaryDirectory(prefix="clipdense-ckpt-") as tmp:
            ckpt = None
            if self.rank == 0:
                write_checkpoint(tmp)
                ckpt = Checkpoint.from_directory(tmp)
            ray.train.report(flat, checkpoint=ckpt, checkpoint_dir_name=f"step_{step:08d}")


def _ray_train_loop(config: dict) -> None:
    cfg = config["cfg"]  # the (sub)class instance itself: stages may subclass TrainConfig
    run_worker(RayEnv(cfg, config["dataset_names"]), config["task_factory"], cfg, config["run_id"],
               config.get("tracking"), config.get("params"), config.get("progress_relay"))


def _summary(cfg: TrainConfig, run_id: str, worker_result: dict | None) -> dict:
    out = Path(cfg.out_dir)
    result_file = out / "result.json"
    summary = dict(worker_result or {})
    if not summary and result_file.is_file():
        summary = json.loads(result_file.read_text())
    restores, metrics_path = [], out / "metrics.jsonl"
    if metrics_path.is_file():
        for line in metrics_path.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("run_id") == run_id and rec.get("event") == "resume":
                restores.append(rec["step"])
    summary.update({"out_dir": str(out), "restored_from_steps": restores, "run_id": run_id})
    return summary


def fit_local(task_factory: TaskFactory, cfg: TrainConfig, *, datasets: dict | None = None,
              tracking: TrackingConfig | None = None, params: dict | None = None) -> dict:
    """Run the training loop in this process (world size 1). `datasets`: name -> Ray Dataset (read via .iterator()).
    `tracking`/`params`: progress and trackers, and the resolved stage config they record (see train/tracking)."""
    if tracking is not None:
        check_installed(tracking)
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.out_dir) / "result.json").unlink(missing_ok=True)
    run_id = uuid.uuid4().hex[:12]
    env = LocalEnv(cfg, datasets)
    summary = _summary(cfg, run_id, run_worker(env, task_factory, cfg, run_id, tracking, params))
    summary["checkpoint"] = str(env.last_checkpoint or env.checkpoints.latest() or "")
    return summary


def fit(task_factory: TaskFactory, cfg: TrainConfig, *, datasets: dict | None = None,
        callbacks: list | None = None, name: str | None = None, dataset_config=None,
        tracking: TrackingConfig | None = None, params: dict | None = None) -> dict:
    """Run the training loop on `cfg.scaling.num_workers` Ray Train workers (TorchTrainer; gloo on CPU, nccl on GPU).

    `datasets` (name -> Ray Dataset) are split among workers (`ray.train.get_dataset_shard(name)` in the task).
    `callbacks` go to RunConfig (e.g. a sweep trial's `sweep.tune.train_reports_to_tune`). Worker failures restart
    the group from the last checkpoint up to `cfg.max_failures` times. Returns rank 0's summary plus the Ray
    result's checkpoint path.
    Progress shows here, on the driver (rank 0 relays its records), per `tracking.progress`.
    In a driver process the run is driven from a child process (`train.isolate`): a crash inside Ray while the run
    is torn down kills that child, not the caller; the run then reruns once from its last checkpoint. A user error
    raised in a worker (a bad row, file or key) comes back as its own one-line error, not Ray's wrapper.
    """
    if tracking is not None:
        check_installed(tracking)
    kwargs = {"datasets": datasets, "callbacks": callbacks, "name": name, "dataset_config": dataset_config,
              "tracking": tracking, "params": params}
    with driver_progress(tracking, cfg.schedule.total_steps) as relay:  # shown here, wherever the driver runs
        if isolation_wanted():
            return run_in_driver_host(fit_here, task_factory, cfg, relay=relay,
                                      what=f"run {name or cfg.name or cfg.out_dir!r}", **kwargs)
        return fit_here(task_factory, cfg, relay=relay, **kwargs)


def fit_here(task_factory: TaskFactory, cfg: TrainConfig, *, datasets: dict | None = None,
             callbacks: list | None = None, name: str | None = None, dataset_config=None,
             tracking: TrackingConfig | None = None, params: dict | None = None, relay=None) -> dict:
    """`fit` with this process as the run's Ray Train driver, rank 0 relaying progress to `relay` (a queue of
    `driver_progress`, or None); a user error from a worker raised as its one line."""
    try:
        return _fit_on_ray(task_factory, cfg, datasets=datasets, callbacks=callbacks, name=name,
                           dataset_config=dataset_config, tracking=tracking, params=params, relay=relay)
    except Exception as e:
        raise_user_error_behind(e)
        raise


def _fit_on_ray(task_factory: TaskFactory, cfg: TrainConfig, *, datasets: dict | None, callbacks: list | None,
                name: str | None, dataset_config, tracking: TrackingConfig | None, params: dict | None,
                relay) -> dict:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    out = Path(cfg.out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").unlink(missing_ok=True)
    cfg = cfg.model_copy(update={"out_dir": str(out)})
    run_id = uuid.uuid4().hex[:12]
    # Ray Train's controller drains each worker's one-slot result queue once per health-check interval (2 s by
    # default), so reporting more often than that stalls training; the driver's value propagates to the controller.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    sc = cfg.scaling
    if sc.start_timeout_s is not None:  # read by the controller, which gets it from this process's environment
        os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(sc.start_timeout_s)
    resources = {"CPU": sc.cpus_per_worker, **({"GPU": sc.gpus_per_worker} if sc.use_gpu else {})}
    workers = (sc.min_workers, sc.num_workers) if sc.elastic else sc.num_workers
    backend = sc.backend if sc.backend != "auto" else ("nccl" if sc.use_gpu else "gloo")
    run_name = name or cfg.name or out.name
    storage, storage_fs, storage_uri = run_storage(cfg, out)
    trainer = TorchTrainer(
        _ray_train_loop,
        train_loop_config={"cfg": cfg, "task_factory": task_factory, "run_id": run_id,
                           "dataset_names": sorted(datasets or {}), "tracking": tracking, "params": params,
                           "progress_relay": relay},
        torch_config=TorchConfig(backend=backend),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=sc.use_gpu,
                                               resources_per_worker=resources,
                                               elastic_resize_monitor_interval_s=sc.resize_interval_s),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=storage, storage_filesystem=storage_fs, callbacks=callbacks,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep)),
        datasets=datasets or None,
        **({"dataset_config": dataset_config} if dataset_config is not None else {}),
    )
    with coordinator_ticks(sc.resize_interval_s, sc.elastic):
        result = trainer.fit()
    summary = _summary(cfg, run_id, None)
    ckpt = result.checkpoint.path if result.checkpoint else ""
    summary["checkpoint"] = f"s3://{ckpt}" if ckpt and storage_uri.startswith("s3://") else ckpt
    summary["ray_storage"] = f"{storage_uri.rstrip('/')}/{run_name}"
    return summary


def run_storage(cfg: TrainConfig, out: Path) -> tuple[str, object | None, str]:
    """(Ray's storage_path, its pyarrow filesystem or None, the same place as a URI) for `checkpoint.storage`
    (default: `out`): an s3:// location is reached through its `Storage` (the checkpoint section's endpoint, else
    AWS_ENDPOINT_URL), so Ray Train itself uploads, lists and restores checkpoints there."""
    uri = cfg.checkpoint.location
    if not uri:
        return str(out), None, str(out)
    if not uri.startswith("s3://"):
        return os.path.abspath(uri), None, os.path.abspath(uri)
    storage = cfg.checkpoint.storage(uri)
    return storage.path.rstrip("/"), storage.fs, uri
