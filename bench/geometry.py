"""A model's input geometry read from its open_clip config (shared by the GPU bench's pretrain and data parts)."""
from __future__ import annotations

import open_clip

from clipdense.models.registry import register_model_configs


def model_geometry(name: str) -> tuple[int, int]:
    """(image size, text context length) from the open_clip config, without building the model."""
    register_model_configs()
    cfg = open_clip.get_model_config(name) or {}
    size = cfg.get("vision_cfg", {}).get("image_size", 224)
    ctx = cfg.get("text_cfg", {}).get("context_length", 77)
    return int(size[0] if isinstance(size, (list, tuple)) else size), int(ctx)
