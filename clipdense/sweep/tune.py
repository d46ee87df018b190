"""Ray Tune wiring of a sweep: one Tune trial = one `clipdense.dense` finetune (Ray 2.60 Train/Tune pattern).

The trial function (`tune.with_resources`, per-trial resources) builds the trial's FinetuneConfig and runs the
finetune with `ray_callbacks=[train_reports_to_tune(...)]` and a stable per-trial name: the finetune runs on Ray
Train workers and reports every eval interval to Tune through the callback (so ASHA can stop it); the trial then
reports the final metrics itself. With `ray.in_process: true` the finetune trains inside the trial actor instead.
Results live in `<out>/trials/<task>/<backbone>/f<fraction>/s<seed>`
(+ `/hp-<hash>` for hyperparameter samples): `trial.json` (coordinates) and the finetune's `metrics.json`.

Resume, twice over: Tune state lives in `<storage or out/tune>/<name>-<grid hash>` (storage may be s3://, so it
outlives the head) and is `Tuner.restore`d (unfinished and errored trials rerun, finished ones not) when the same
grid is run again; and a trial whose `metrics.json` exists
returns at once without training, so a changed grid or a lost Tune state never repeats finished work.
"""
from __future__ import annotations

import json
import math
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.train.v2.api.callback import UserCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.util.queue import Empty, Queue

from clipdense.config import with_values
from clipdense.data.storage import Storage
from clipdense.dense.base_config import FinetuneBase
from clipdense.dense.run import run as run_finetune
from clipdense.ray_session import ray_session
from clipdense.sweep.callbacks import TrialProgress, tune_callbacks
from clipdense.sweep.config import SearchDim, SweepConfig
from clipdense.sweep.fit import FitJob, fit_jobs, run_fit_job
from clipdense.sweep.grid import (
    METRICS_FILE,
    TRIAL_FILE,
    Trial,
    flat_metrics,
    hparam_label,
    plain_hparams,
    trial_dir,
)
from clipdense.train.tracking import TrackingConfig

TOKEN_CPU = 0.01
STOPPED_FILE = "early_stopped.json"   # written by the driver for trials a scheduler stopped (not rerun)


def finetune_config(spec: dict, hparams: dict[str, Any], out_dir: Path) -> FinetuneBase:
    """The trial's finetune config: the grid's (validated on the driver) with the sampled hyperparameters (each
    validated as it is set) and its output directory (a hyperparameter sample's own)."""
    return with_values(spec["finetune"], {**hparams, "out_dir": str(out_dir)}, f"{spec['source']} (trial "
                       f"{spec['name']})")


def _trial_fn(config: dict, specs: dict) -> None:
    """Runs inside a Tune trial actor."""
    spec = specs[config["trial"]]
    if os.path.isdir(spec["cwd"]):
        os.chdir(spec["cwd"])           # Tune moves trial actors into their own dirs; config paths are cwd-relative
    hparams = plain_hparams(config.get("hp"))
    name = spec["name"] + (f"/{hparam_label(hparams)}" if hparams else "")
    out_dir = Path(spec["trials_root"]) / name
    if not _report_earlier_result(out_dir):
        _run_trial(spec, hparams, name, out_dir)


def _report_earlier_result(out_dir: Path) -> bool:
    """A trial finished (or stopped early by the scheduler) in an earlier run: report its final metrics as the
    runner would, instead of training again."""
    done, stopped = out_dir / METRICS_FILE, out_dir / STOPPED_FILE
    if done.is_file():
        doc = json.loads(done.read_text())
        steps = (doc.get("train") or {}).get("steps")
        tune.report({**{f"eval/{k}": v for k, v in flat_metrics(doc.get("metrics") or {}).items()},
                     **({"step": steps} if steps else {}), "skipped": 1.0})
        return True
    if stopped.is_file():
        tune.report({**flat_metrics(json.loads(stopped.read_text())), "skipped": 1.0})
        return True
    return False


def _run_trial(spec: dict, hparams: dict, name: str, out_dir: Path) -> None:
    cfg = finetune_config(spec, hparams, out_dir)
    # each trial is logged once, by Tune's callbacks (the sweep's `tracking`): the trial itself tracks nothing and
    # prints no progress (the driver prints a line per trial result: sweep/callbacks)
    cfg = cfg.model_copy(update={"tracking": TrackingConfig(progress="off")})
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / TRIAL_FILE).write_text(json.dumps({**spec["coords"], "hp": hparam_label(hparams) if hparams else None,
                                                  "hparams": hparams, "name": name}, indent=2))
    with train_reports_to_tune(spec.get("report_metric")) as callback:
        result = run_finetune(cfg, ray_callbacks=[callback], name=name.replace("/", "_"))
    tune.report({**flat_metrics((result or {}).get("metrics") or {}), "skipped": 0.0})


@contextmanager
def train_reports_to_tune(metric: str | None):
    """A Ray Train callback whose reports reach Tune from this trial's own threads, while the block runs.

    Ray's TuneReportCallback hands reports to the trial actor's main thread, which then blocks putting them on the
    one-slot result queue if the trial function's own report (or return) filled it first: the trial hangs for good
    whenever the Tune driver is slow to ask for the last Train report (a W&B logger made that frequent). Here the
    controller's reports go to a Ray queue that a thread of this trial drains with `tune.report`, and the block
    ends only once all of them are reported, so reports reach Tune one producer at a time. With a scheduler, only
    reports carrying its metric are forwarded: the runner also reports train-loss logs, which Tune would reject as
    results without the metric."""
    reports = Queue(actor_options={"num_cpus": 0})

    class QueueReportCallback(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and (metric is None or metric in metrics[0]):
                reports.put(dict(metrics[0]))

    finished = threading.Event()

    def forward() -> None:
        while True:
            try:
                tune.report(reports.get(timeout=0.2))
            except Empty:
                if finished.is_set() and reports.empty():
                    return

    forwarder = threading.Thread(target=forward, name="train-reports-to-tune", daemon=True)
    forwarder.start()
    try:
        yield QueueReportCallback()
    finally:
        finished.set()
        forwarder.join()
        reports.shutdown(force=True)


def _search_dim(dim: SearchDim):
    kind = dim.kind
    value = getattr(dim, kind)
    return {"loguniform": lambda: tune.loguniform(*value), "uniform": lambda: tune.uniform(*value),
            "randint": lambda: tune.randint(value[0], value[1] + 1), "choice": lambda: tune.choice(value),
            "grid": lambda: tune.grid_search(value)}[kind]()


def trial_resources(cfg: SweepConfig, ft_cfgs: list) -> tuple[dict[str, float], dict[str, float]]:
    """(what the Tune trial actor holds, what one trial uses in all, incl. its Ray Train workers)."""
    holds, total = {"CPU": 0.0, "GPU": 0.0}, {"CPU": 0.0, "GPU": 0.0}
    for c in ft_cfgs:
        sc = c.train.scaling
        local = c.ray.in_process is True
        gpu = sc.gpus_per_worker if sc.use_gpu else 0.0
        h = {"CPU": cfg.resources.cpu if cfg.resources.cpu is not None else (sc.cpus_per_worker if local else 0.0),
             "GPU": cfg.resources.gpu if cfg.resources.gpu is not None else (min(gpu, 1.0) if local else 0.0)}
        workers = 0 if local else sc.num_workers
        t = {"CPU": h["CPU"] + workers * sc.cpus_per_worker, "GPU": h["GPU"] + workers * gpu}
        holds = {k: max(holds[k], h[k]) for k in holds}
        total = {k: max(total[k], t[k]) for k in total}
    return holds, total


def max_concurrent(cfg: SweepConfig, per_trial: dict[str, float], cluster: dict[str, float]) -> int:
    """`resources.max_concurrent_trials`, else how many trials' CPUs and GPUs fit in the cluster (at least 1)."""
    if cfg.resources.max_concurrent_trials:
        return cfg.resources.max_concurrent_trials
    fits = [math.floor(cluster.get(k, 0.0) / v + 1e-9) for k, v in per_trial.items() if v > 0]
    return max(1, min(fits)) if fits else max(1, int(cluster.get("CPU", 1)))


def _dirname(trial) -> str:
    return f"{trial.config['trial'].replace('/', '_')}_{trial.trial_id}"


def report_metric(cfg: SweepConfig, first: Trial) -> str | None:
    """The reported metric a scheduler compares (None without one: every report is forwarded)."""
    return (cfg.scheduler.metric or f"eval/{first.metric}") if cfg.scheduler.type != "fifo" else None


def run_tune(cfg: SweepConfig, trials: list[Trial], experiment: str, state: Storage) -> dict:
    """Run (or resume) the sweep's Tune experiment `experiment`, its state kept under `state`; returns counts and
    the names of failed trials."""
    out = Path(cfg.out).absolute()
    ft_cfgs = [t.finetune for t in trials]
    pending = [t.name for t in trials if cfg.search_space or not (trial_dir(out, t.name) / METRICS_FILE).is_file()]
    summary = {"trials": len(trials), "skipped": len(trials) - len(pending), "failed": [], "stopped": []}
    if not pending:
        return summary
    with ray_session(cfg.ray, log_to_driver=cfg.verbose > 1):
        holds, per_trial = trial_resources(cfg, ft_cfgs)
        concurrency = summary["max_concurrent_trials"] = max_concurrent(cfg, per_trial, ray.cluster_resources())
        metric = report_metric(cfg, trials[0])
        specs = {t.name: {**_spec(cfg, t, out), "report_metric": metric} for t in trials}
        # Tune refuses an empty request: a waiting trial actor takes a token CPU share
        trainable = tune.with_resources(tune.with_parameters(_trial_fn, specs=specs),
                                        {k: v for k, v in holds.items() if v > 0} or {"CPU": TOKEN_CPU})
        fs = state.fs if state.remote else None   # Tune takes a local path without a filesystem
        root = state.path.rstrip("/")
        path = f"{root}/{experiment}"
        if tune.Tuner.can_restore(path, storage_filesystem=fs):
            tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, restart_errored=True,
                                       storage_filesystem=fs)
            summary["restored"] = state.child(experiment).uri
        else:
            totals = {t.name: t.total_steps for t in trials}
            tuner = tune.Tuner(trainable, param_space=_param_space(cfg, pending),
                               tune_config=_tune_config(cfg, metric, trials[0].mode, concurrency),
                               run_config=tune.RunConfig(
                                   name=experiment, storage_path=root, storage_filesystem=fs,
                                   verbose=cfg.verbose, callbacks=_callbacks(cfg, totals, out),
                                   failure_config=tune.FailureConfig(max_failures=cfg.max_failures)))
        _tally(tuner.fit(), out / "trials", summary)
        summary["experiment"] = state.child(experiment).uri
        return summary


def _param_space(cfg: SweepConfig, pending: list[str]) -> dict[str, Any]:
    space: dict[str, Any] = {"trial": tune.grid_search(pending)}
    if cfg.search_space:
        space["hp"] = {k: _search_dim(v) for k, v in cfg.search_space.items()}
    return space


def _tune_config(cfg: SweepConfig, metric: str | None, mode: str, concurrency: int) -> tune.TuneConfig:
    scheduler = None
    if cfg.scheduler.type == "asha":
        sc = cfg.scheduler
        scheduler = ASHAScheduler(time_attr=sc.time_attr, metric=metric, mode=sc.mode or mode, max_t=sc.max_t,
                                  grace_period=sc.grace_period, reduction_factor=sc.reduction_factor)
    return tune.TuneConfig(num_samples=cfg.num_samples, scheduler=scheduler, trial_dirname_creator=_dirname,
                           search_alg=BasicVariantGenerator(max_concurrent=concurrency, random_state=cfg.search_seed))


def _callbacks(cfg: SweepConfig, total_steps: dict[str, int], out: Path) -> list:
    return [TrialProgress(cfg.tracking.progress, total_steps), *tune_callbacks(cfg.tracking, out)]


def _tally(results, trials_root: Path, summary: dict) -> None:
    """Failed trials (one line each) and trials a scheduler stopped early (their last metrics kept, so a rerun
    reports them instead of training them again) into `summary`."""
    for r in results:
        name = (r.config or {}).get("trial", "?")
        hp = plain_hparams((r.config or {}).get("hp"))
        tdir = trials_root / name / (hparam_label(hp) if hp else "")
        if r.error is not None:
            summary["failed"].append(f"{name}: {str(r.error).strip().splitlines()[-1][:200]}")
        elif not (tdir / METRICS_FILE).is_file() and tdir.is_dir():
            (tdir / STOPPED_FILE).write_text(json.dumps(r.metrics or {}, indent=2, default=str))
            summary["stopped"].append(str(tdir.relative_to(trials_root)))


def _spec(cfg: SweepConfig, t: Trial, out: Path) -> dict:
    return {"name": t.name, "finetune": t.finetune, "source": t.source, "coords": t.coordinates(),
            "trials_root": str(out / "trials"), "cwd": os.getcwd()}


def _fit_job_in_task(job: FitJob) -> dict:
    """A fit job in a Ray task: in the driver's directory (config paths are cwd-relative)."""
    if os.path.isdir(job.cwd):
        os.chdir(job.cwd)
    return run_fit_job(job)




def run_fit(cfg: SweepConfig, trials: list[Trial], sweep_hash: str | None = None) -> dict:
    """protocol fit: one job per (backbone, task) with pending trials, as Ray tasks (`resources.cpu` each, default
    1; `resources.max_concurrent_trials` at once, default: as many as the cluster's CPUs hold) or in this process."""
    out = Path(cfg.out).absolute()
    jobs = fit_jobs(cfg, trials, out, sweep_hash)
    pending = sum(len(j.trials) for j in jobs)
    summary = {"trials": len(trials), "skipped": len(trials) - pending, "failed": [], "stopped": [],
               "protocol": "fit", "jobs": len(jobs)}
    if not jobs:
        return summary
    summary["in_process"] = cfg.fit.in_process or (cfg.fit.in_process is None and len(jobs) == 1)
    if summary["in_process"]:
        results = [run_fit_job(j) for j in jobs]
    else:
        with ray_session(cfg.ray, log_to_driver=cfg.verbose > 1):
            cpus = cfg.resources.cpu if cfg.resources.cpu is not None else 1.0
            task = ray.remote(_fit_job_in_task).options(num_cpus=cpus, num_gpus=cfg.resources.gpu or 0)
            limit = max_concurrent(cfg, {"CPU": cpus}, ray.cluster_resources())
            results = _bounded(task, jobs, limit)
    for r in results:
        summary["failed"].extend(r["failed"])
    return summary


def _bounded(task, jobs: list[FitJob], limit: int) -> list[dict]:
    """Run `task` over `jobs`, at most `limit` at once; results in job order."""
    refs, running = {}, []
    for i, job in enumerate(jobs):
        if len(running) >= limit:
            _, running = ray.wait(running, num_returns=1)
        ref = task.remote(job)
        refs[i] = ref
        running.append(ref)
    return ray.get([refs[i] for i in range(len(jobs))])
