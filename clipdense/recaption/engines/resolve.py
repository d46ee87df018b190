"""The engine as the driver resolves it once, before any actor starts: its checks (user mistakes fail here, in one
line), the image form the CPU stage hands it, and the provenance columns of every output row. Each engine's part
comes from its registered spec (registry.py); what is common to all is here. Nothing here loads a model."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from clipdense.config import ConfigError
from clipdense.recaption.config import DecodeConfig, EngineConfig
from clipdense.recaption.decode import ImageInput
from clipdense.recaption.engines.registry import engine_spec
from clipdense.recaption.engines.vllm import check_vllm

# check_vllm lives with its engine (vllm.py) and stays importable from here
__all__ = ["Engine", "check_vllm", "image_input", "provenance", "resolve_engine", "sampling_params", "weights_id"]


@dataclass(frozen=True)
class Engine:
    config: EngineConfig
    image: ImageInput                   # what the CPU stage hands the captioner
    provenance: dict[str, str | None]   # constant columns beside every output row

    def caption_seeds(self, key: str) -> list[int] | None:
        """The seed of each of a row's captions (what the engine seeded its sampling with); None: not seeded."""
        return engine_spec(self.config.kind).caption_seeds(self.config, key)


def resolve_engine(engine: EngineConfig, decode: DecodeConfig, remote: bool) -> Engine:
    """`remote`: the actors run on a cluster, so local files (model dir, venv python) are not checked here."""
    model_size = engine_spec(engine.kind).check(engine, remote)
    if engine.num_gpus == 0 and engine.device == "cuda":
        raise ConfigError("engine.device=cuda needs engine.num_gpus > 0 (actors see no GPU otherwise)")
    weights = None if remote else weights_id(engine)
    return Engine(engine, image_input(engine, decode, model_size), {**provenance(engine), "weights": weights})


def image_input(engine: EngineConfig, decode: DecodeConfig, model_size: int | None = None) -> ImageInput:
    """What the CPU stage should hand this engine: square uint8 arrays (`decode.size`, else the model's image
    side, else 224), or small JPEGs for VLMs."""
    mode = decode.mode if decode.mode != "auto" else engine_spec(engine.kind).image_mode
    return ImageInput(mode=mode, size=decode.size or model_size or 224, max_pixels=engine.max_pixels,
                      jpeg_quality=decode.jpeg_quality, max_image_pixels=decode.max_image_pixels)


def sampling_params(cfg: EngineConfig) -> dict:
    params = engine_spec(cfg.kind).sampling(cfg)
    if cfg.rerank:
        params["rerank"] = cfg.rerank.model_dump()
    return params


def provenance(cfg: EngineConfig) -> dict[str, str | None]:
    """Constant columns written beside every output row: engine, model, prompt, sampling (JSON)."""
    spec = engine_spec(cfg.kind)
    return {"engine": cfg.kind, "model": spec.model_id(cfg), "prompt": spec.prompt(cfg),
            "sampling": json.dumps(sampling_params(cfg), sort_keys=True)}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_id(cfg: EngineConfig) -> str | None:
    """Which weights made the captions: a revision where the config names one (vLLM `engine_kwargs.revision`, an
    open_clip pretrained tag), else `sha256:` of the checkpoint file or of the weights folder (each file's relative
    path and sha256, in order); None for echo, random weights, or a hub id without a revision."""
    ref = engine_spec(cfg.kind).weights(cfg)
    if ref and ref.startswith("revision:"):
        return ref
    if not ref or not os.path.exists(os.path.expanduser(ref)):
        return None
    root = Path(os.path.expanduser(ref))
    if root.is_file():
        return f"sha256:{file_sha256(root)}"
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(root).as_posix()}\0{file_sha256(f)}\n".encode())
    return f"sha256:{h.hexdigest()}"
