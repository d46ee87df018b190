"""Provenance: the code version comes from git in the package's own checkout (an installed copy inside some other
repository does not count), else from the submitter's CLIPDENSE_CODE_VERSION, else is unknown; the config hash
ignores where a run writes and changes with anything else; dense metrics.json, bench results and submitted jobs
carry it; the config package still loads neither torch nor Ray."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import common
from clipdense.config import code_version, config_hash, run_provenance
from clipdense.config.provenance import CODE_VERSION_ENV, PACKAGE_DIR, env_version, git_version
from clipdense.dense.task import metrics_record
from clipdense.dense.tasks.seg.config import SegFinetune
from clipdense.jobs.build import SubmitArgs, build_job, code_version_env

ROOT = Path(__file__).resolve().parents[1]
GIT_ID = ["-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *GIT_ID, *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def copied_package(dest: Path) -> Path:
    """The config package (and the package's __init__) copied outside any checkout: what a Ray job's working_dir
    looks like once uploaded without .git."""
    shutil.copytree(PACKAGE_DIR / "config", dest / "clipdense" / "config",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PACKAGE_DIR / "__init__.py", dest / "clipdense" / "__init__.py")
    return dest / "clipdense"


def version_in_subprocess(package_root: Path, env_value: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (CODE_VERSION_ENV, "PYTHONPATH")}
    env["PYTHONPATH"] = str(package_root)
    if env_value is not None:
        env[CODE_VERSION_ENV] = env_value
    code = ("import json, sys, clipdense.config as c; print(json.dumps([c.__file__, c.code_version(), "
            "c.run_provenance({'a': 1}), [m for m in ('torch', 'ray') if m in sys.modules]]))")
    done = subprocess.run([sys.executable, "-c", code], cwd=package_root, env=env, capture_output=True, text=True,
                          check=True, timeout=60)
    where, version, provenance, heavy = json.loads(done.stdout)
    assert Path(where).is_relative_to(package_root), "the copy, not the checkout, must be imported"
    assert heavy == [], "the config package must not load torch or Ray"
    assert provenance["code_version"] == version
    return version


def test_code_version_is_this_checkouts_head_and_dirty_flag():
    before = git(ROOT, "rev-parse", "HEAD")
    found = git_version(PACKAGE_DIR)
    after = git(ROOT, "rev-parse", "HEAD")  # other commits may land meanwhile
    assert found["source"] == "git" and found["commit"] in (before, after)
    dirty = bool(git(ROOT, "status", "--porcelain", "--untracked-files=no"))
    assert isinstance(found["dirty"], bool) and (found["dirty"] == dirty or before != after)
    assert code_version()["source"] == "git" and code_version() == code_version()  # cached, a fresh dict each


def test_a_package_outside_any_checkout_takes_the_submitters_env_else_is_unknown(tmp_path):
    copied_package(tmp_path)
    assert version_in_subprocess(tmp_path, "abc123+dirty") == {"commit": "abc123", "dirty": True, "source": "env"}
    assert version_in_subprocess(tmp_path, "abc123") == {"commit": "abc123", "dirty": False, "source": "env"}
    assert version_in_subprocess(tmp_path, None) == {"commit": None, "dirty": None, "source": "unknown"}
    assert env_version(" ") is None and env_version("+dirty") is None


def test_git_counts_only_when_the_package_is_tracked_there(tmp_path):
    package = copied_package(tmp_path)
    git(tmp_path, "init", "-q")
    assert git_version(package) is None, "an untracked copy inside another repository is not that commit"
    git(tmp_path, "add", "clipdense")
    git(tmp_path, "commit", "-q", "-m", "x")
    head = git(tmp_path, "rev-parse", "HEAD")
    assert git_version(package) == {"commit": head, "dirty": False, "source": "git"}
    (package / "__init__.py").write_text("# changed\n")
    assert git_version(package) == {"commit": head, "dirty": True, "source": "git"}
    (package / "untracked.py").write_text("")
    git(tmp_path, "checkout", "-q", "--", "clipdense/__init__.py")
    assert git_version(package)["dirty"] is False, "untracked files do not make the tree dirty"


def test_config_hash_ignores_out_and_fresh_and_changes_with_anything_else():
    base = {"seed": 0, "steps": 10, "nested": {"lr": 0.1, "layers": [1, 2]}, "out": "a", "fresh": False}
    h = config_hash(base)
    assert len(h) == 12 and int(h, 16) >= 0
    assert config_hash({**base, "out": "b", "fresh": True}) == h
    assert config_hash(dict(reversed(list(base.items())))) == h, "key order does not matter"
    for changed in ({"seed": 1}, {"steps": 11}, {"nested": {"lr": 0.1, "layers": [2, 1]}}, {"extra": None}):
        assert config_hash({**base, **changed}) != h, changed
    no_seed = ("seed", "out", "fresh")
    assert config_hash({**base, "seed": 1}, exclude=no_seed) == config_hash(base, exclude=no_seed) != h
    assert config_hash({"p": Path("x")}) == config_hash({"p": "x"}), "non-JSON values hash by their str"


def test_run_provenance_records_versions_cores_and_the_hash():
    rec = run_provenance({"seed": 3, "out": "x"})
    assert rec["config_hash"] == config_hash({"seed": 3}) and run_provenance()["config_hash"] is None
    assert rec["code_version"] == code_version() and rec["cores"] == os.cpu_count()
    assert rec["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert set(rec["versions"]) == {"clipdense", "torch", "ray", "open_clip_torch", "timm", "python"}
    assert all(rec["versions"][k] for k in ("clipdense", "torch", "ray", "open_clip_torch", "python"))
    assert rec["created"].endswith("+00:00")


def test_dense_metrics_record_carries_provenance_whose_hash_ignores_out_dir():
    rec = metrics_record(SegFinetune(), {"miou": 0.5}, {"name": "clip-tiny"}, {})
    moved = metrics_record(SegFinetune(out_dir="elsewhere"), {"miou": 0.5}, {}, {})
    other = metrics_record(SegFinetune(save_predictions="p"), {"miou": 0.5}, {}, {})
    assert rec["provenance"]["code_version"] == code_version() and rec["backbone"] == {"name": "clip-tiny"}
    assert moved["provenance"]["config_hash"] == rec["provenance"]["config_hash"]
    assert other["provenance"]["config_hash"] != rec["provenance"]["config_hash"]
    json.dumps(rec)


def test_bench_results_record_the_code_version(tmp_path):
    path = common.save("x", [common.row("x", "m", 1.0, 1.0, "p", "u")], tmp_path)
    payload = json.loads(path.read_text())
    assert payload["code_version"] == code_version() and payload["rows"][0]["bench"] == "x"
    assert {"name", "date", "hardware"} <= set(payload)


@pytest.mark.parametrize("user_value", [None, "mine"])
def test_a_submitted_job_carries_the_checkouts_code_version(user_value, tmp_path):
    own = {CODE_VERSION_ENV: user_value} if user_value else {}
    _, runtime_env = build_job(SubmitArgs(stage="demo", validate=False, env_vars=own))
    version = git_version(PACKAGE_DIR)
    expected = user_value or version["commit"] + ("+dirty" if version["dirty"] else "")
    assert runtime_env["env_vars"][CODE_VERSION_ENV] == expected, "the user's own value wins"
    assert ".git/" in runtime_env["excludes"], "the job's working_dir is uploaded without .git"
    assert code_version_env(tmp_path) == {}, "a folder that is no checkout has no version to pass"
