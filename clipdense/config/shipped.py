"""Where shipped files live, both in a checkout and in an installed (non-editable) copy, and shipped configs by
name: `--config clip-tiny-shapes` is `configs/pretrain/clip-tiny-shapes.yaml` for the pretrain stage."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from clipdense.config.errors import ConfigError

# CLI command -> its folder under configs/
CONFIG_FOLDERS = {"synth": "synth", "recaption": "recaption", "pretrain": "pretrain", "finetune": "finetune",
                  "sweep": "sweep", "demo": "demo"}


def configs_dir() -> Path:
    """The shipped `configs/` tree (model JSONs, experiment YAMLs)."""
    return Path(str(resources.files("clipdense.configs")))


def shipped_configs(command: str | None = None) -> dict[str, Path]:
    """`command/name` -> file of every shipped stage config (or one command's)."""
    found = {}
    for cmd, folder in CONFIG_FOLDERS.items():
        if command in (None, cmd):
            for path in sorted((configs_dir() / folder).glob("*.yaml")):
                found[f"{cmd}/{path.stem}"] = path
    return found


def description(path: Path) -> str:
    """A config's first comment line: what it is."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return ""


def resolve_config(command: str, spec: str | None) -> str | None:
    """A config file for `command`: an existing path wins; else a bare name (or `command/name`) of a shipped one."""
    if spec is None or Path(spec).exists():
        return spec
    name = spec.removesuffix(".yaml")
    name = name if "/" in name else f"{command}/{name}"
    shipped = shipped_configs()
    if name in shipped:
        return str(shipped[name])
    if "/" in spec.removeprefix(f"{command}/") or spec.endswith((".yaml", ".yml")):
        raise ConfigError(f"config file not found: {spec}")
    names = ", ".join(n.split("/", 1)[1] for n in shipped if n.startswith(f"{command}/")) or "none"
    raise ConfigError(f"config {spec!r}: no such file, nor a shipped {command} config (shipped: {names})")
