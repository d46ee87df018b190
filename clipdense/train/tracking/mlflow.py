"""MLflow: the store a run logs to, opened (and checked) before the run starts, and the tracker that logs the
resolved config as params, every metric with its step, and the export as artefacts.

A sqlite store (the local default, config.py) opens as it is, here and in `mlflow ui --backend-store-uri <same URI>`;
its folder is made if missing, and runs' artefacts go beside the database (`<dir>/mlartifacts`) for experiments made
here. A file store is what the user asked for (a `file:` URI, or a folder that already holds one), so it is allowed
(`MLFLOW_ALLOW_FILE_STORE=true`; MLflow 3 refuses file stores by default and keeps them in maintenance mode): read it
with `MlflowClient(<same URI>)` or `mlflow ui --backend-store-uri <same URI>` under the same variable. A value the
user set wins. A remote server is not contacted before the run (it may come up later; it is only warned about), and
its HTTP client gets short timeouts and few retries.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from clipdense.config import ConfigError
from clipdense.train.tracking.config import MlflowConfig, file_store_path, is_local_store, require, sqlite_path

ARTIFACTS_DIR = "mlartifacts"  # beside a sqlite database (the folder `mlflow server` uses by default)


def short_mlflow_timeouts() -> None:
    """A server that goes away must cost seconds, not minutes: MLflow's client defaults retry for ~2 minutes. A dead
    server refuses at once (the retry's backoff is what it costs); the read timeout is for a live but slow one (a
    busy machine's server took over 5 s to answer its first request in CI), which then answers within it, or costs
    the run at most two waits before its tracker is dropped. Values the user set in the environment win."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def _local_folder(uri: str) -> tuple[Path, str] | None:
    """The folder a local store writes in, and what it is: a file store's directory, or a database's folder."""
    store = file_store_path(uri)
    if store is not None:
        return store, "file store"
    db = sqlite_path(uri)
    return (db.parent, "database") if db is not None else None


def _check_folder(uri: str, where: str) -> None:
    """A local store's folder made (a file store allowed); one that cannot be made or written is one line."""
    local = _local_folder(uri)
    if local is None:
        return
    folder, what = local
    if what == "file store":
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{where}: cannot create the {what} directory ({e.strerror or e})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{where}: the {what} directory is not writable")


def open_mlflow_store(uri: str):
    """An MlflowClient for `uri`, or a one-line ConfigError when the store cannot be used as configured: a URI no
    MLflow store takes, a local store's folder that cannot be created or written, a local store that does not open
    (see the module docstring)."""
    mlflow = require("mlflow", "tracking.mlflow")
    short_mlflow_timeouts()
    where = f"tracking.mlflow.tracking_uri {uri!r}"
    _check_folder(uri, where)
    try:
        client = mlflow.MlflowClient(tracking_uri=uri)
        if is_local_store(uri):
            client.search_experiments(max_results=1)  # opens the store: a refused or broken one fails here
    except Exception as e:
        raise ConfigError(f"{where}: MLflow cannot use it ({_first_line(e)})") from None
    return client


def artifact_location(uri: str) -> str | None:
    """Where an experiment made here keeps its runs' artefacts: beside a local sqlite database (MLflow's own
    default is the working directory's `mlruns/`, a Ray worker's temporary one); the store's choice elsewhere."""
    db = sqlite_path(uri)
    return str(db.parent / ARTIFACTS_DIR) if db is not None else None


def _flat_params(d: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat_params(v, key + "."))
        else:
            out[key] = str(v)[:500]  # MLflow caps a param value's length
    return out


class MlflowTracker:
    name = "mlflow"

    def __init__(self, cfg: MlflowConfig, out_dir: Path, run_id: str, params: dict):
        mlflow = require("mlflow", "tracking.mlflow")
        self.client = open_mlflow_store(cfg.tracking_uri)
        try:
            self._start(mlflow, cfg, out_dir, run_id, params)
        except Exception as e:
            if not is_local_store(cfg.tracking_uri):
                raise  # a server down at start: RunWatchers warns and trains on
            raise ConfigError(f"tracking.mlflow.tracking_uri {cfg.tracking_uri!r}: cannot start a run in this "
                              f"store ({_first_line(e)})") from None

    def _start(self, mlflow, cfg: MlflowConfig, out_dir: Path, run_id: str, params: dict) -> None:
        exp = self.client.get_experiment_by_name(cfg.experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(
            cfg.experiment, artifact_location=artifact_location(cfg.tracking_uri))
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
