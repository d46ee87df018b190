"""Stage packages whose heavy exports load on first use (PEP 562), so that importing one of their light submodules
does not import torch and open_clip with the whole stage. That is what a Ray Data task does when it unpickles one of
the stage's row functions, and the CLI when it parses a config: every such worker process paid seconds of imports
(bench/results/pretrain_profile.md)."""
from __future__ import annotations

import importlib
import sys
import types
from typing import Any


class LazyPackage(types.ModuleType):
    """A package module whose `_lazy_exports` (attribute -> the submodule defining it) are imported when first
    read. A submodule named like its export (`run.py` defining `run`) never hides it: the import system binds a
    package's submodules on it, and that binding is dropped for these names."""

    def __getattr__(self, name: str) -> Any:      # called only for attributes not set yet
        exports = self.__dict__.get("_lazy_exports", {})
        if name not in exports:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{self.__name__}.{exports[name]}"), name)
        super().__setattr__(name, value)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and name in self.__dict__.get("_lazy_exports", {}):
            return
        super().__setattr__(name, value)


def lazy_exports(package: str, exports: dict[str, str]) -> None:
    """Make the (already executing) package `package` load `exports` on first use; call it from its __init__."""
    module = sys.modules[package]
    module._lazy_exports = exports
    module.__class__ = LazyPackage
