"""The engine as the driver resolves it once, before any actor starts: its checks (user mistakes fail here, in one
line), the image form the CPU stage hands it, and the provenance columns of every output row. Nothing here loads a
model."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from clipdense.config import ConfigError
from clipdense.recaption.config import DecodeConfig, EngineConfig
from clipdense.recaption.decode import ImageInput
from clipdense.recaption.engines import load_coca
from clipdense.recaption.engines.seeds import row_seed
from clipdense.recaption.engines.vllm import sampling_kwargs


@dataclass(frozen=True)
class Engine:
    config: EngineConfig
    image: ImageInput                   # what the CPU stage hands the captioner
    provenance: dict[str, str | None]   # constant columns beside every output row

    def caption_seeds(self, key: str) -> list[int] | None:
        """The seed of each of a row's captions (what the engine seeded its sampling with); echo: none."""
        cfg = self.config
        if cfg.kind == "coca":
            return [row_seed(cfg.seed, key, j) for j in range(cfg.samples)]
        if cfg.kind == "vllm":  # one request per row, its n samples from one seed
            return [row_seed(cfg.seed, key)] * cfg.samples
        return None


def resolve_engine(engine: EngineConfig, decode: DecodeConfig, remote: bool) -> Engine:
    """`remote`: the actors run on a cluster, so local files (model dir, venv python) are not checked here."""
    model_size = None
    if engine.kind == "coca":
        model_size = load_coca().check_coca(engine.model_name, engine.checkpoint, engine.seq_len)
    if engine.kind == "vllm" and not remote:
        check_vllm(engine)
    if engine.num_gpus == 0 and engine.device == "cuda":
        raise ConfigError("engine.device=cuda needs engine.num_gpus > 0 (actors see no GPU otherwise)")
    weights = None if remote else weights_id(engine)
    return Engine(engine, image_input(engine, decode, model_size), {**provenance(engine), "weights": weights})


def image_input(engine: EngineConfig, decode: DecodeConfig, model_size: int | None = None) -> ImageInput:
    """What the CPU stage should hand this engine: square uint8 arrays (`decode.size`, else the model's image
    side, else 224), or small JPEGs for VLMs."""
    mode = decode.mode if decode.mode != "auto" else ("jpeg" if engine.kind == "vllm" else "array")
    return ImageInput(mode=mode, size=decode.size or model_size or 224, max_pixels=engine.max_pixels,
                      jpeg_quality=decode.jpeg_quality, max_image_pixels=decode.max_image_pixels)


def sampling_params(cfg: EngineConfig) -> dict:
    params = engine_sampling(cfg)
    if cfg.rerank:
        params["rerank"] = cfg.rerank.model_dump()
    return params


def engine_sampling(cfg: EngineConfig) -> dict:
    if cfg.kind == "echo":
        return {"n": cfg.samples}
    if cfg.kind == "coca":
        return {"n": cfg.samples, "generation_type": "top_p", "top_p": cfg.top_p,
                "temperature": cfg.temperature, "seq_len": cfg.seq_len, "min_seq_len": cfg.min_seq_len,
                "fixed_output_length": True, "cut_at_period": cfg.cut, "seed": cfg.seed}
    return {**sampling_kwargs(cfg.samples, cfg.top_p, cfg.temperature, cfg.max_tokens),
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
    revision = cfg.engine_kwargs.get("revision") if cfg.kind == "vllm" else None
    path = cfg.checkpoint if cfg.kind == "coca" else (cfg.model if cfg.kind == "vllm" else None)
    if revision or (cfg.kind == "coca" and not cfg.checkpoint and cfg.pretrained):
        return f"revision:{revision or cfg.pretrained}"
    if not path or not os.path.exists(os.path.expanduser(path)):
        return None
    root = Path(os.path.expanduser(path))
    if root.is_file():
        return f"sha256:{file_sha256(root)}"
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(root).as_posix()}\0{file_sha256(f)}\n".encode())
    return f"sha256:{h.hexdigest()}"


def check_vllm(engine: EngineConfig) -> None:
    """vLLM importable (here or in the configured venv) and a local model directory present."""
    py_exe = (engine.runtime_env or {}).get("py_executable")
    if py_exe and not os.path.isfile(py_exe.split()[0]):
        raise ConfigError(f"engine.runtime_env.py_executable: not found: {py_exe} (build one with "
                          "`clipdense vllm-env DIR`)")
    if not py_exe and importlib.util.find_spec("vllm") is None:
        raise ConfigError("engine.kind=vllm needs vLLM: pip install 'clipdense[vllm]' (GPU), or build a CPU vLLM "
                          "env with `clipdense vllm-env DIR` and set engine.runtime_env.py_executable=DIR/bin/python")
    model = engine.model_name
    if model.startswith(("/", ".", "~")) and not os.path.isdir(os.path.expanduser(model)):
        raise ConfigError(f"engine.model: model directory not found: {model}")
