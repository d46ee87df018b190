"""Captioner engines (`engine.kind`): echo, coca, vllm. `build_captioner(cfg)` makes one (in an actor);
`image_input` and `provenance` answer on the driver without loading any model."""
from __future__ import annotations

import json

from clipdense.recaption.config import DecodeConfig, EngineConfig
from clipdense.recaption.decode import ImageInput
from clipdense.recaption.engines.base import Captioner, EngineOutputError, check_output, cut_caption, to_pil

__all__ = ["Captioner", "EngineOutputError", "build_captioner", "check_output", "cut_caption", "image_input",
           "provenance", "sampling_params", "to_pil"]


def build_captioner(cfg: EngineConfig) -> Captioner:
    if cfg.kind == "echo":
        from clipdense.recaption.engines.echo import EchoCaptioner
        return EchoCaptioner()
    if cfg.kind == "coca":
        from clipdense.recaption.engines.coca import CocaCaptioner
        return CocaCaptioner(cfg.model_name, cfg.pretrained, cfg.checkpoint, top_p=cfg.top_p,
                             temperature=cfg.temperature, seq_len=cfg.seq_len, min_seq_len=cfg.min_seq_len,
                             cut_at_period=cfg.cut, seed=cfg.seed, device=cfg.device)
    from clipdense.recaption.engines.vllm import VLLMCaptioner
    return VLLMCaptioner(cfg.model_name, prompt=cfg.prompt, system_prompt=cfg.system_prompt, top_p=cfg.top_p,
                         temperature=cfg.temperature, max_tokens=cfg.max_tokens, max_pixels=cfg.max_pixels,
                         engine_kwargs=cfg.engine_kwargs, seed=cfg.seed, cut_at_period=cfg.cut)


def image_input(engine: EngineConfig, decode: DecodeConfig) -> ImageInput:
    """What the CPU stage should hand this engine: square uint8 arrays, or small JPEGs for VLMs."""
    mode = decode.mode if decode.mode != "auto" else ("jpeg" if engine.kind == "vllm" else "array")
    size = decode.size
    if size is None and engine.kind == "coca":
        from clipdense.recaption.engines.coca import coca_image_size
        size = coca_image_size(engine.model_name)
    return ImageInput(mode=mode, size=size or 224, max_pixels=engine.max_pixels, jpeg_quality=decode.jpeg_quality,
                      max_image_pixels=decode.max_image_pixels)


def sampling_params(cfg: EngineConfig) -> dict:
    if cfg.kind == "echo":
        return {"n": cfg.num_captions}
    if cfg.kind == "coca":
        return {"n": cfg.num_captions, "generation_type": "top_p", "top_p": cfg.top_p,
                "temperature": cfg.temperature, "seq_len": cfg.seq_len, "min_seq_len": cfg.min_seq_len,
                "fixed_output_length": True, "cut_at_period": cfg.cut, "seed": cfg.seed}
    from clipdense.recaption.engines.vllm import sampling_kwargs
    return {**sampling_kwargs(cfg.num_captions, cfg.top_p, cfg.temperature, cfg.max_tokens),
            "max_pixels": cfg.max_pixels, "cut_at_period": cfg.cut, "engine_seed": cfg.seed,
            "request_seed": "row_seed(engine_seed, key)"}


def provenance(cfg: EngineConfig) -> dict[str, str | None]:
    """Constant columns written beside every output row: engine, model, prompt, sampling (JSON)."""
    model = cfg.model_name
    if cfg.kind == "coca" and (cfg.checkpoint or cfg.pretrained):
        model = f"{model}:{cfg.checkpoint or cfg.pretrained}"
    prompt = None
    if cfg.kind == "vllm":
        prompt = cfg.prompt if not cfg.system_prompt else json.dumps({"system": cfg.system_prompt,
                                                                      "user": cfg.prompt})
    return {"engine": cfg.kind, "model": model, "prompt": prompt,
            "sampling": json.dumps(sampling_params(cfg), sort_keys=True)}
