"""The `tracking` section (one for pretrain, finetune and sweep), what its MLflow URI means, and the optional
libraries' import (`require`: a missing one is a one-line error naming the extra).

MLflow's local default is a sqlite store, which `mlflow ui` opens as it is (MLflow 3 refuses file stores unless
`MLFLOW_ALLOW_FILE_STORE=true` is set, also to read one back): a bare directory path names the folder of a sqlite
database (`<dir>/mlflow.db`; a path ending in `.db` is the database itself). A directory that already holds a file
store (runs written by an earlier version) stays one, as does an explicit `file:` URI (see mlflow.py).
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlparse

from pydantic import Field, field_validator

from clipdense.config import Config, ConfigError

EXTRA = 'pip install "clipdense[tracking]"'
MLFLOW_SCHEMELESS = ("databricks", "databricks-uc", "uc")  # URIs MLflow reads without a scheme that are no path
SQLITE_FILE = "mlflow.db"  # the database a bare directory path holds (MLflow's own default name)


def require(module: str, feature: str):
    """Import an optional tracking library or fail with one line naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{feature} needs the '{module}' package: {EXTRA}") from None


class MlflowConfig(Config):
    tracking_uri: str = Field("sqlite:///mlflow.db", validate_default=True, description=(
        "http://host:port of an MLflow server, a database (sqlite:///path.db), or a directory path, which holds a "
        "sqlite database (<dir>/mlflow.db); a file: URI is a file store. Default: MLflow's own, mlflow.db in the "
        "working directory (`mlflow ui` run there opens it)"))
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
    if parsed.scheme == "" and uri not in MLFLOW_SCHEMELESS:
        return Path(uri).expanduser()
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost"):
        return Path(unquote(parsed.path)).expanduser()
    return None


def holds_file_store(path: Path) -> bool:
    """Whether a directory already holds an MLflow file store: an experiment folder with its meta.yaml (MLflow's
    own test when it picks its default store)."""
    try:
        return any(p.is_dir() and p.name.isdigit() and (p / "meta.yaml").exists() for p in path.iterdir())
    except OSError:
        return False


def absolute_store_uri(uri: str) -> str:
    """A local store's URI with its path made absolute: a bare path becomes its sqlite database (unless it already
    holds a file store, see the module docstring), `file:` and `sqlite:` keep their form."""
    uri = uri.strip()
    if urlparse(uri).scheme == "" and uri not in MLFLOW_SCHEMELESS:
        path = Path(uri).expanduser().absolute()
        if holds_file_store(path):
            return str(path)
        return f"sqlite:///{path if path.suffix == '.db' else path / SQLITE_FILE}"
    path = file_store_path(uri)
    if path is not None:
        return "file://" + str(path.absolute())
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):  # three slashes: relative to the cwd
        db, sep, query = uri[len("sqlite:///"):].partition("?")
        if db and db != ":memory:":
            return f"sqlite:///{Path(db).expanduser().absolute()}{sep}{query}"
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of a local sqlite store (`sqlite:////abs/path.db`); None for any other store."""
    if not uri.startswith("sqlite:///"):
        return None
    db = uri[len("sqlite:///"):].partition("?")[0]
    return None if db in ("", ":memory:") else Path(db)


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
