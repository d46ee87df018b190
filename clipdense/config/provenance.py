"""Where a result came from: the code version (git commit + dirty flag), a hash of the config that made it, the
library versions and the cores. Every results file records `run_provenance(...)` so a figure can be traced to its
code and config. Nothing here imports torch or Ray: versions come from installed package metadata."""
from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import subprocess
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

# Set by the job submitter when a Ray job's working_dir carries no .git: "<sha>" or "<sha>+dirty".
CODE_VERSION_ENV = "CLIPDENSE_CODE_VERSION"
DIRTY_SUFFIX = "+dirty"
VERSIONED_PACKAGES = ("clipdense", "torch", "ray", "open_clip_torch", "timm")
DEFAULT_EXCLUDE = ("out", "fresh")
_GIT_TIMEOUT_S = 10
PACKAGE_DIR = Path(__file__).resolve().parents[1]


def _git(directory: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=directory, capture_output=True, text=True,
                              timeout=_GIT_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_version(package_dir: Path) -> dict | None:
    """The commit and dirty flag of the git checkout holding `package_dir`, or None when the package is not a
    tracked part of one (an installed copy inside some other repository's tree does not count)."""
    if not package_dir.is_dir() or not _git(package_dir, "ls-files", "--", "__init__.py"):
        return None
    commit = _git(package_dir, "rev-parse", "HEAD")
    status = _git(package_dir, "status", "--porcelain", "--untracked-files=no")
    if not commit or status is None:
        return None
    return {"commit": commit, "dirty": bool(status), "source": "git"}


def env_version(value: str | None) -> dict | None:
    """The code version the submitter passed in CLIPDENSE_CODE_VERSION ("<sha>" or "<sha>+dirty"), or None."""
    value = (value or "").strip()
    dirty = value.endswith(DIRTY_SUFFIX)
    commit = value[: -len(DIRTY_SUFFIX)] if dirty else value
    if not commit:
        return None
    return {"commit": commit, "dirty": dirty, "source": "env"}


@functools.lru_cache(maxsize=1)
def _cached_code_version() -> tuple[tuple[str, object], ...]:
    found = (git_version(PACKAGE_DIR) or env_version(os.environ.get(CODE_VERSION_ENV))
             or {"commit": None, "dirty": None, "source": "unknown"})
    return tuple(found.items())


def code_version() -> dict:
    """{"commit", "dirty", "source"}: from git in this package's checkout, else from CLIPDENSE_CODE_VERSION, else
    unknown (commit and dirty None). Computed once per process; never raises."""
    try:
        return dict(_cached_code_version())
    except Exception:  # provenance must never break a run
        return {"commit": None, "dirty": None, "source": "unknown"}


def format_code_version(version: Mapping) -> str | None:
    """The CLIPDENSE_CODE_VERSION form of a code version ("<sha>" or "<sha>+dirty"), None without a commit."""
    if not version.get("commit"):
        return None
    return version["commit"] + (DIRTY_SUFFIX if version.get("dirty") else "")


def config_hash(data: Mapping, exclude: Iterable[str] = DEFAULT_EXCLUDE) -> str:
    """12 hex chars of sha256 over canonical JSON of `data`, leaving out the top-level keys in `exclude` (where a
    run writes and whether it starts afresh do not change what it computes)."""
    dropped = set(exclude)
    kept = {key: value for key, value in data.items() if key not in dropped}
    text = json.dumps(kept, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def package_versions() -> dict:
    """Installed versions of the packages a result depends on (None where not installed), plus Python's."""
    versions: dict[str, str | None] = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["python"] = platform.python_version()
    return versions


def run_provenance(config: Mapping | None = None, exclude: Iterable[str] = DEFAULT_EXCLUDE) -> dict:
    """What a results file records about its run: code version, config hash (None without a config), library
    versions, the cores of this machine and when it was written (UTC)."""
    return {
        "code_version": code_version(),
        "config_hash": config_hash(config, exclude) if config is not None else None,
        "versions": package_versions(),
        "cores": os.cpu_count(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
