"""Captioner engines, each registered under its `engine.kind` (registry.py): echo, coca, vllm. `build_captioner(cfg)`
makes one (in an actor); what the driver resolves about the engine (checks, image form, provenance) is in
engines/resolve.py. A new engine is a module that calls `register_engine(EngineSpec(...))` when imported.

This package is on the captioner actors' import path, which for vLLM runs in its own venv without torch or
open_clip: only light modules are imported here (coca registers from coca_spec.py and loads coca.py lazily)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from clipdense.recaption.engines import coca_spec, echo, vllm  # noqa: F401 (importing them registers the engines)
from clipdense.recaption.engines.base import Captioner, EngineOutputError, check_output, cut_caption, to_pil
from clipdense.recaption.engines.coca_spec import load_coca
from clipdense.recaption.engines.registry import EngineSpec, engine_kinds, engine_spec, register_engine

if TYPE_CHECKING:
    from clipdense.recaption.config import EngineConfig

__all__ = ["Captioner", "EngineOutputError", "EngineSpec", "build_captioner", "check_output", "cut_caption",
           "engine_kinds", "engine_spec", "load_coca", "register_engine", "to_pil"]


def build_captioner(cfg: EngineConfig) -> Captioner:
    return engine_spec(cfg.kind).build(cfg)
