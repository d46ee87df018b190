"""Watching a run: progress lines in the terminal and experiment trackers (TensorBoard, MLflow, W&B), rank 0 only.

One `tracking` section serves pretrain, finetune and sweep. The training loop hands every record it writes to
`metrics.jsonl` to `RunWatchers.write`, which prints a progress line (on Ray Train: relays it to the driver, see
`driver_progress`) and forwards the numbers to the trackers.
Trackers are optional extras (`pip install "clipdense[tracking]"`); a tracker that fails (its server went away,
a disk filled) is warned about once and switched off, never allowed to stop or stall training: MLflow's HTTP
client gets short timeouts and few retries. A tracker that cannot start because of its configuration (an MLflow
URI no store takes, a store directory that cannot be written) is a one-line ConfigError before the run starts.
"""
from __future__ import annotations

import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlparse

from pydantic import Field, field_validator

from clipdense.config import Config, ConfigError

EXTRA = 'pip install "clipdense[tracking]"'


class MlflowConfig(Config):
    tracking_uri: str = Field(..., description="http://host:port of an MLflow server, a file store directory "
                              "(path or file: URI), or a database (sqlite:///path.db)")
    experiment: str = "clipdense"
    run_name: str | None = Field(None, description="default: the run's out_dir name")

    @field_validator("tracking_uri")
    @classmethod
    def _absolute(cls, uri: str) -> str:
        # made absolute where the config is built (the driver): Ray workers run in another working directory
        if not uri.strip():
            raise ValueError("is empty: give a server URL, a store directory or a sqlite:/// database")
        return absolute_store_uri(uri)


def file_store_path(uri: str) -> Path | None:
    """The directory of an MLflow file store (a bare path or a local file: URI); None for any other store."""
    parsed = urlparse(uri)
    if parsed.scheme == "" and uri not in ("databricks", "databricks-uc", "uc"):  # MLflow's scheme-less URIs
        return Path(uri).expanduser()
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost"):
        return Path(unquote(parsed.path)).expanduser()
    return None


def absolute_store_uri(uri: str) -> str:
    """A local store's URI with its path made absolute, in the form the user wrote it (path, file:, sqlite:)."""
    uri = uri.strip()
    path = file_store_path(uri)
    if path is not None:
        return str(path.absolute()) if urlparse(uri).scheme == "" else "file://" + str(path.absolute())
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):  # three slashes: relative to the cwd
        db, sep, query = uri[len("sqlite:///"):].partition("?")
        if db and db != ":memory:":
            return f"sqlite:///{Path(db).expanduser().absolute()}{sep}{query}"
    return uri


def is_local_store(uri: str) -> bool:
    return file_store_path(uri) is not None or urlparse(uri).scheme.startswith("sqlite")


class WandbConfig(Config):
    project: str = "clipdense"
    mode: Literal["online", "offline", "disabled"] = "online"
    entity: str | None = None
    run_name: str | None = None


class TrackingConfig(Config):
    progress: Literal["auto", "lines", "bar", "off"] = Field(
        "auto", description="terminal progress on rank 0: auto = a tqdm bar on a TTY, else one line per log interval")
    tensorboard: bool = Field(False, description="TensorBoard event files under <out_dir>/tensorboard")
    mlflow: MlflowConfig | None = None
    wandb: WandbConfig | None = None
    ray_data_progress: bool = Field(False, description="show Ray Data's own progress bars (off: they would drown "
                                    "the training progress)")


def require(module: str, feature: str):
    """Import an optional tracking library or fail with one line naming the extra."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{feature} needs the '{module}' package: {EXTRA}") from None


def check_installed(cfg: TrackingConfig) -> None:
    """Fail before a run starts (in the driver) if a configured tracker's library is missing, or its MLflow store
    cannot work as configured."""
    if cfg.tensorboard:
        require("torch.utils.tensorboard", "tracking.tensorboard")
    if cfg.mlflow is not None:
        open_mlflow_store(cfg.mlflow)
    if cfg.wandb is not None:
        require("wandb", "tracking.wandb")


def _scalars(record: dict) -> dict[str, float]:
    return {k: float(v) for k, v in record.items() if k not in ("step", "epoch", "time") and
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


def _flat_params(d: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat_params(v, key + "."))
        else:
            out[key] = str(v)[:500]  # MLflow caps a param value's length
    return out


def short_mlflow_timeouts() -> None:
    """A server that goes away must cost seconds, not minutes: MLflow's client defaults retry for ~2 minutes.
    Values the user set in the environment win."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def open_mlflow_store(cfg: MlflowConfig):
    """An MlflowClient for `cfg.tracking_uri`, or a one-line ConfigError when the store cannot be used as
    configured: a URI no MLflow store takes, a file store directory that cannot be created or written, a local
    store that does not open. A remote server is not contacted here (it may come up later; it is only warned about).

    A file store directory is what the user asked for, so it is allowed (`MLFLOW_ALLOW_FILE_STORE=true`; MLflow 3
    refuses file stores by default and keeps them in maintenance mode): read it with `MlflowClient(<same path>)`
    or `mlflow ui --backend-store-uri <same path>` under the same variable. A value the user set wins."""
    mlflow = require("mlflow", "tracking.mlflow")
    short_mlflow_timeouts()
    uri, where = cfg.tracking_uri, f"tracking.mlflow.tracking_uri {cfg.tracking_uri!r}"
    store = file_store_path(uri)
    if store is not None:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            store.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"{where}: cannot create the file store directory ({e.strerror or e})") from None
        if not os.access(store, os.W_OK | os.X_OK):
            raise ConfigError(f"{where}: the file store directory is not writable")
    try:
        client = mlflow.MlflowClient(tracking_uri=uri)
        if is_local_store(uri):
            client.search_experiments(max_results=1)  # opens the store: a refused or broken one fails here
    except Exception as e:
        raise ConfigError(f"{where}: MLflow cannot use it ({_first_line(e)})") from None
    return client


class _TensorBoard:
    name = "tensorboard"

    def __init__(self, out_dir: Path, run_id: str, params: dict):
        tb = require("torch.utils.tensorboard", "tracking.tensorboard")
        self.writer = tb.SummaryWriter(log_dir=str(out_dir / "tensorboard"))

    def log(self, scalars: dict, step: int) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def artifacts(self, path: Path) -> None:
        pass

    def close(self) -> None:
        self.writer.close()


class _Mlflow:
    name = "mlflow"

    def __init__(self, cfg: MlflowConfig, out_dir: Path, run_id: str, params: dict):
        mlflow = require("mlflow", "tracking.mlflow")
        self.client = open_mlflow_store(cfg)
        try:
            self._start(mlflow, cfg, out_dir, run_id, params)
        except Exception as e:
            if not is_local_store(cfg.tracking_uri):
                raise  # a server down at start: RunWatchers warns and trains on
            raise ConfigError(f"tracking.mlflow.tracking_uri {cfg.tracking_uri!r}: cannot start a run in this "
                              f"store ({_first_line(e)})") from None

    def _start(self, mlflow, cfg: MlflowConfig, out_dir: Path, run_id: str, params: dict) -> None:
        exp = self.client.get_experiment_by_name(cfg.experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(cfg.experiment)
        self.run_id = self.client.create_run(exp_id, run_name=cfg.run_name or out_dir.name,
                                             tags={"clipdense.run_id": run_id}).info.run_id
        flat = _flat_params(params)
        items = [mlflow.entities.Param(k, v) for k, v in sorted(flat.items())]
        for i in range(0, len(items), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=items[i:i + 100])
        self._metric = mlflow.entities.Metric

    def log(self, scalars: dict, step: int) -> None:
        now = int(time.time() * 1000)
        metrics = [self._metric(k.replace("@", "_at_"), v, now, step) for k, v in scalars.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def artifacts(self, path: Path) -> None:
        self.client.log_artifacts(self.run_id, str(path), artifact_path=path.name)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class _Wandb:
    name = "wandb"

    def __init__(self, cfg: WandbConfig, out_dir: Path, run_id: str, params: dict):
        wandb = require("wandb", "tracking.wandb")
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, mode=cfg.mode, dir=str(out_dir),
                              name=cfg.run_name or out_dir.name, id=None, config=params, reinit="create_new")
        self._wandb = wandb

    def log(self, scalars: dict, step: int) -> None:
        self.run.log(scalars, step=step)

    def artifacts(self, path: Path) -> None:
        art = self._wandb.Artifact(f"{path.name}-{self.run.id}", type="model")
        art.add_dir(str(path))
        self.run.log_artifact(art)

    def close(self) -> None:
        self.run.finish()


class Progress:
    """`step k/N`, loss, lr, samples/s, data-wait fraction and ETA, one line per log interval (or a tqdm bar).

    The one formatter of progress: rank 0 in-process, the driver of a Ray Train run (`driver_progress`) and a
    sweep's per-trial lines (`sweep/progress`, with `prefix` naming the trial) all print through it."""

    def __init__(self, mode: str, total_steps: int, start_step: int = 0, stream=None, prefix: str = ""):
        self.stream = stream or sys.stdout
        tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.mode = ("bar" if tty else "lines") if mode == "auto" else mode
        self.total, self.step0, self.t0 = total_steps, start_step, time.perf_counter()
        self.prefix = prefix
        self.anchored = False  # the ETA's clock moves to the first logged step (see `write`)
        self.bar = None
        if self.mode == "bar":
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, file=self.stream, dynamic_ncols=True, unit="step",
                            desc=prefix.strip() or None)

    def eta(self, step) -> str:
        if not isinstance(step, int) or step <= self.step0:
            return "?"
        rate = (step - self.step0) / max(time.perf_counter() - self.t0, 1e-9)
        s = int((self.total - step) / rate)
        return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"

    def line(self, record: dict) -> str:
        step = record.get("step")
        step = "?" if step is None else int(step) if float(step).is_integer() else step  # Tune's results: floats
        if record.get("event") == "resume":
            return (f"resumed at step {step}/{self.total} (epoch {record.get('epoch')}, "
                    f"world size {record.get('world_size')})")
        parts = []
        if "loss" in record:
            parts = [f"step {step}/{self.total}", f"loss {record['loss']:.4f}", f"lr {record.get('lr', 0):.3g}",
                     f"{record.get('samples_per_s', 0):.1f} samples/s",
                     f"data wait {100 * record.get('data_wait_frac', 0):.0f}%", f"ETA {self.eta(step)}"]
        evals = {k: v for k, v in record.items() if k.startswith("eval/") and isinstance(v, (int, float))}
        if evals:
            parts.append(("" if parts else f"step {step}/{self.total}  ") + "eval "
                         + " ".join(f"{k[5:]} {v:.4g}" for k, v in sorted(evals.items())))
        return "  ".join(parts)

    def write(self, record: dict) -> None:
        if self.mode == "off":
            return
        if record.get("event") == "resume":  # the ETA counts from here (a driver learns the start step this way)
            self.step0, self.t0, self.anchored = record.get("step") or 0, time.perf_counter(), False
        text = self.line(record)
        if not text:
            return
        if self.bar is not None:
            self.bar.n = int(record.get("step") or self.bar.n)
            self.bar.set_postfix_str(text, refresh=True)
        else:
            print(f"[clipdense] {self.prefix}{text}", file=self.stream, flush=True)
        if not self.anchored and "loss" in record and record.get("step") is not None:
            # later ETAs from the training rate since this step: the time before it (workers starting, the first
            # blocks decoding) says nothing about the steps left
            self.step0, self.t0, self.anchored = int(record["step"]), time.perf_counter(), True

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class RunWatchers:
    """Everything that watches a run from rank 0: the progress printer and the configured trackers.

    `relay` (a Ray queue, on Ray Train workers): records and tracker warnings go to the driver, which prints them
    (`driver_progress`); a worker's own output ends in Ray's logs, not in the user's terminal."""

    def __init__(self, cfg: TrackingConfig | None, out_dir: Path, run_id: str, total_steps: int,
                 start_step: int = 0, params: dict | None = None, is_main: bool = True, relay=None):
        cfg = cfg or TrackingConfig()
        self.relay = relay if is_main else None
        self.progress = Progress(cfg.progress if is_main and relay is None else "off", total_steps, start_step)
        self.trackers: list = []
        if not is_main:
            return
        makers = []
        if cfg.tensorboard:
            makers.append(lambda: _TensorBoard(out_dir, run_id, params or {}))
        if cfg.mlflow is not None:
            makers.append(lambda: _Mlflow(cfg.mlflow, out_dir, run_id, params or {}))
        if cfg.wandb is not None:
            makers.append(lambda: _Wandb(cfg.wandb, out_dir, run_id, params or {}))
        for make in makers:
            try:
                self.trackers.append(make())
            except ConfigError:
                raise
            except Exception as e:  # a tracking server down at start: train anyway
                self._warn(f"tracking: could not start a tracker ({type(e).__name__}: {e}); training continues "
                           "without it")

    def _send(self, item: dict) -> None:
        if self.relay is None:
            return
        try:
            self.relay.put_nowait(item)
        except Exception as e:  # the driver's queue is gone: the run goes on, unwatched from there
            self.relay = None
            warnings.warn(f"progress: the driver stopped listening ({type(e).__name__}: {str(e)[:200]})",
                          stacklevel=2)

    def _warn(self, message: str) -> None:
        warnings.warn(message, stacklevel=3)
        self._send({"warning": message})

    def _each(self, fn_name: str, *args) -> None:
        for t in list(self.trackers):
            try:
                getattr(t, fn_name)(*args)
            except Exception as e:
                self.trackers.remove(t)
                self._warn(f"tracking: {t.name} failed ({type(e).__name__}: {str(e)[:200]}); it is switched off "
                           "for the rest of this run, training continues")

    def write(self, record: dict) -> None:
        self.progress.write(record)
        self._send(record)
        scalars = _scalars(record)
        if scalars and record.get("step") is not None:
            self._each("log", scalars, int(record["step"]))

    def artifacts(self, path: Path) -> None:
        if path.exists():
            self._each("artifacts", path)

    def close(self) -> None:
        self.progress.close()
        self._each("close")

