"""`coca`'s registration, light: the engine itself (coca.py) imports torch and open_clip, which the vLLM actors'
venv lacks, so it is loaded only where a coca engine is checked or built (`load_coca`)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from clipdense.recaption.engines.registry import EngineSpec, register_engine
from clipdense.recaption.engines.seeds import row_seed

if TYPE_CHECKING:
    from clipdense.recaption.config import EngineConfig
    from clipdense.recaption.engines.coca import CocaCaptioner

# DataCompDR (apple/ml-mobileclip-dr scripts/gen.py): open_clip coca_ViT-L-14, 5 samples, top-p 0.9, seq_len 30.
DATACOMPDR_COCA = "coca_ViT-L-14"


def load_coca():
    """The coca engine module, loaded only where a coca engine is used."""
    # local: coca.py imports torch and open_clip, which the vllm actors' venv lacks (they import this package)
    from clipdense.recaption.engines import coca

    return coca


def build_coca(cfg: EngineConfig) -> CocaCaptioner:
    return load_coca().CocaCaptioner(cfg.model_name, cfg.pretrained, cfg.checkpoint, top_p=cfg.top_p,
                                     temperature=cfg.temperature, seq_len=cfg.seq_len, min_seq_len=cfg.min_seq_len,
                                     cut_at_period=cfg.cut, seed=cfg.seed, device=cfg.device)


def check_coca(cfg: EngineConfig, remote: bool) -> int | None:
    return load_coca().check_coca(cfg.model_name, cfg.checkpoint, cfg.seq_len)


def coca_seq_len_rule(cfg: EngineConfig) -> None:
    if cfg.seq_len <= cfg.min_seq_len:
        raise ValueError(f"engine.seq_len ({cfg.seq_len}) must be larger than engine.min_seq_len "
                         f"({cfg.min_seq_len})")


def coca_sampling(cfg: EngineConfig) -> dict:
    return {"n": cfg.samples, "generation_type": "top_p", "top_p": cfg.top_p, "temperature": cfg.temperature,
            "seq_len": cfg.seq_len, "min_seq_len": cfg.min_seq_len, "fixed_output_length": True,
            "cut_at_period": cfg.cut, "seed": cfg.seed}


def coca_caption_seeds(cfg: EngineConfig, key: str) -> list[int]:
    return [row_seed(cfg.seed, key, j) for j in range(cfg.samples)]  # one seed per caption


def coca_weights(cfg: EngineConfig) -> str | None:
    return cfg.checkpoint or (f"revision:{cfg.pretrained}" if cfg.pretrained else None)


def coca_model_id(cfg: EngineConfig) -> str:
    weights = cfg.checkpoint or cfg.pretrained
    return f"{cfg.model_name}:{weights}" if weights else cfg.model_name


COCA = register_engine(EngineSpec(
    name="coca", build=build_coca, sampling=coca_sampling, check=check_coca, config_rules=coca_seq_len_rule,
    caption_seeds=coca_caption_seeds, default_model=DATACOMPDR_COCA, cut_at_period_default=True,
    weights=coca_weights, model_id=coca_model_id))
