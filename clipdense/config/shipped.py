"""Where shipped files live, both in a checkout and in an installed (non-editable) copy."""
from __future__ import annotations

from importlib import resources
from pathlib import Path


def configs_dir() -> Path:
    """The shipped `configs/` tree (model JSONs, experiment YAMLs)."""
    return Path(str(resources.files("clipdense.configs")))
