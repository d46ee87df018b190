"""The wheel built from this checkout works without it: installed in a fresh venv, run from a folder outside the
repository, `clipdense --version`, shipped configs by name and the quick demo (at a smaller scale) run.

The venv reuses this environment's packages instead of downloading them: its site-packages holds a path file
naming ours (a plain path line: ours is searched after the venv's own, and its `.pth` files, such as the editable
install's, are not run), and the wheel goes in with `--no-deps`. The wheel is built from a copy of the checkout
(setuptools builds in the source tree), without build isolation (no index needed: setuptools is installed here).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP_COPY = shutil.ignore_patterns(".git", ".venv", ".ci-venv", "runs", "out", "build", "dist", "*.egg-info",
                                   "__pycache__", ".pytest_cache", "results", ".whl", ".gl")
# The quick demo with every step smaller (~2 min instead of ~4 on 2 cores): what is under test is that each step
# finds its code and shipped files in the installed package, not the demo's numbers (tests/test_demo.py runs it at
# --quick scale from the checkout).
DEMO_SCALE = ["scale.synth.web_images=128", "scale.synth.shard_size=64", "scale.captioner_steps=4",
              "scale.clip_steps=4", "scale.finetune_steps=2", "scale.recaption.num_captions=1",
              "scale.eval_images=2"]

pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path, env: dict, timeout: float = 600) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                                  f"{proc.stderr[-6000:]}")
    return proc.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict]:
    """(the venv's bin folder, an environment running it) with the wheel of this checkout installed."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=SKIP_COPY)   # clipdense/configs stays a link to ../configs
    wheels = tmp / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "--no-index",
          "-w", str(wheels)], cwd=tmp, env=dict(os.environ))
    wheel = next(wheels.glob("clipdense-*.whl"))

    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = Path(subprocess.check_output([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    (site / "reuse_outer_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", str(wheel)],
         cwd=tmp, env=dict(os.environ))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return venv / "bin", env


@pytest.fixture
def outside(tmp_path) -> Path:
    """A working folder with no checkout above it."""
    assert not any((p / "pyproject.toml").exists() for p in [tmp_path, *tmp_path.parents])
    return tmp_path


@pytest.mark.timeout(900)   # builds the wheel and the venv first
def test_the_installed_package_is_the_wheel_not_the_checkout(installed, outside):
    bin_dir, env = installed
    where = _run([str(bin_dir / "python"), "-c", "import clipdense; print(clipdense.__file__)"], outside, env)
    assert str(bin_dir.parent) in where and str(ROOT) not in where


def test_version_and_shipped_configs_by_name(installed, outside):
    bin_dir, env = installed
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)[1]
    clipdense = str(bin_dir / "clipdense")
    assert _run([clipdense, "--version"], outside, env).strip() == f"clipdense {version}"
    printed = _run([clipdense, "pretrain", "--config", "clip-tiny-shapes", "--print-config"], outside, env)
    assert "name: clip-tiny" in printed and "runs/pretrain/clip-tiny-shapes" in printed
    listing = _run([clipdense, "configs"], outside, env)
    assert "sweep/quickstart" in listing and "demo/quick" in listing
    assert "scale:" in _run([clipdense, "configs", "show", "demo/quick"], outside, env)


@pytest.mark.timeout(1800)
def test_quick_demo_runs_outside_the_checkout(installed, outside):
    bin_dir, env = installed
    _run([str(bin_dir / "clipdense"), "demo", "--quick", "--out", "runs/demo", *DEMO_SCALE], outside, env,
         timeout=1500)
    summary = json.loads((outside / "runs" / "demo" / "demo_summary.json").read_text())
    assert summary["preset"] == "quick" and summary["seconds"] > 0
    assert (outside / "runs" / "demo" / "sweep" / "report.md").is_file()
    assert len(list((outside / "runs" / "demo" / "sweep").rglob("metrics.json"))) == 12
