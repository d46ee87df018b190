"""Captioner engines (`engine.kind`): echo, coca, vllm. `build_captioner(cfg)` makes one (in an actor); what the
driver resolves about the engine (checks, image form, provenance) is in engines/resolve.py.

This package is on the captioner actors' import path, which for vLLM runs in its own venv without torch or
open_clip: only light modules are imported at the top."""
from __future__ import annotations

from clipdense.recaption.config import EngineConfig
from clipdense.recaption.engines.base import Captioner, EngineOutputError, check_output, cut_caption, to_pil
from clipdense.recaption.engines.echo import EchoCaptioner
from clipdense.recaption.engines.vllm import VLLMCaptioner

__all__ = ["Captioner", "EngineOutputError", "build_captioner", "check_output", "cut_caption", "load_coca", "to_pil"]


def build_captioner(cfg: EngineConfig) -> Captioner:
    if cfg.kind == "echo":
        return EchoCaptioner()
    if cfg.kind == "coca":
        return load_coca().CocaCaptioner(cfg.model_name, cfg.pretrained, cfg.checkpoint, top_p=cfg.top_p,
                             temperature=cfg.temperature, seq_len=cfg.seq_len, min_seq_len=cfg.min_seq_len,
                             cut_at_period=cfg.cut, seed=cfg.seed, device=cfg.device)
    return VLLMCaptioner(cfg.model_name, prompt=cfg.prompt, system_prompt=cfg.system_prompt, top_p=cfg.top_p,
                         temperature=cfg.temperature, max_tokens=cfg.max_tokens, max_pixels=cfg.max_pixels,
                         engine_kwargs=cfg.engine_kwargs, seed=cfg.seed, cut_at_period=cfg.cut)


def load_coca():
    """The coca engine module, loaded only where a coca engine is used."""
    # local: coca.py imports torch and open_clip, which the vllm actors' venv lacks (they import this package)
    from clipdense.recaption.engines import coca

    return coca
