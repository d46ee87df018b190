"""The wheel built from this checkout works without it: installed in a fresh venv and run from a folder outside the
repository, it holds every tracked file of clipdense/ and configs/ byte for byte, imports every module, finds its
shipped configs, model JSONs and BPE vocabulary, and its CLI runs (`--version`, configs by name, the quick demo's
resolved config, a tiny synthetic world).

What this no longer does: run the whole quick demo from the installed copy (~4 min on 2 cores). The demo's own
behaviour is tested from the checkout (tests/test_demo.py); what the installed copy adds is only where code and
shipped files are found, and that is what the file-list comparison, the import of every module and the commands
below check (a file left out of the wheel fails the comparison; code that finds a file through the checkout fails
the snippet or a command run outside it).

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


# Run in the installed venv from outside the checkout: every module imports, and the shipped model JSONs and BPE
# vocabulary (package data) build a model and a tokenizer.
INSTALLED_SNIPPET = """
import importlib, json, pkgutil
import clipdense
from clipdense.config import configs_dir
from clipdense.models.registry import create_clip, tokenizer_for
names = [m.name for m in pkgutil.walk_packages(clipdense.__path__, "clipdense.")]
for name in names:
    importlib.import_module(name)
tokens = tokenizer_for("clip-demo")(["a red square"])
create_clip("coca-tiny")
print(json.dumps({"file": clipdense.__file__, "configs": str(configs_dir()), "modules": names,
                  "vocab": int(tokens.max())}))
"""


def _tracked_package_files() -> dict[str, bytes]:
    """Installed path (relative to site-packages) -> content, for every tracked file of clipdense/ and configs/
    (configs/ ships as clipdense/configs through the symlink)."""
    listed = subprocess.run(["git", "ls-files", "-s", "clipdense", "configs"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.splitlines()
    files = {}
    for line in listed:
        mode, path = line.split()[0], line.split("\t", 1)[1]
        if mode == "120000":  # the clipdense/configs link itself
            continue
        files[path if path.startswith("clipdense/") else f"clipdense/{path}"] = (ROOT / path).read_bytes()
    return files


def test_installed_files_are_the_checkouts_tracked_files(installed):
    """Every tracked file under clipdense/ and configs/ is installed with the same bytes, and nothing installed is
    absent from the checkout (a file left out by package-data patterns fails here)."""
    bin_dir, env = installed
    site = Path(_run([str(bin_dir / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     bin_dir, env).strip())
    pkg = site / "clipdense"
    installed_files = {str(p.relative_to(site)) for p in pkg.rglob("*")
                       if p.is_file() and "__pycache__" not in p.parts}
    tracked = _tracked_package_files()
    assert sorted(set(tracked) - installed_files) == [], "tracked files missing from the installed package"
    extra = [f for f in installed_files - set(tracked) if not (ROOT / f).is_file()]
    assert extra == [], "installed files that are not in the checkout"
    changed = [f for f, data in tracked.items() if (site / f).read_bytes() != data]
    assert changed == [], "installed files that differ from the checkout"


def test_every_module_imports_and_finds_shipped_files_outside_the_checkout(installed, outside):
    bin_dir, env = installed
    found = json.loads(_run([str(bin_dir / "python"), "-c", INSTALLED_SNIPPET], outside, env).splitlines()[-1])
    assert found["file"].startswith(str(bin_dir.parent)) and found["configs"].startswith(str(bin_dir.parent))
    checkout = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                for p in (ROOT / "clipdense").rglob("*.py") if "configs" not in p.parts}
    assert checkout - {"clipdense"} <= set(found["modules"])
    assert 0 < found["vocab"] < 8514  # the shipped 8k BPE, not open_clip's own 49408-token one


def test_demo_config_and_a_tiny_world_outside_the_checkout(installed, outside):
    bin_dir, env = installed
    clipdense = str(bin_dir / "clipdense")
    printed = _run([clipdense, "demo", "--quick", "--print-config"], outside, env)
    assert "quick: true" in printed and "scale:" in printed
    _run([clipdense, "synth", "--out", "world", "--preset", "tiny", "workers=1", "web_images=8", "shard_size=8",
          "ade_train=2", "ade_val=1", "nyu_train=2", "nyu_test=1", "coco_train=2", "coco_val=1"], outside, env)
    summary = json.loads((outside / "world" / "synth.json").read_text())
    assert (outside / "world" / "web" / "00000.tar").is_file() and summary["resolved"]["web_images"] == 8
