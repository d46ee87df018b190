"""Model creation: open_clip names (plus our tiny configs) and timm names, one entry point per family."""
from clipdense.models.registry import create_clip, create_clip_and_transforms, register_model_configs, tokenizer_for

__all__ = ["create_clip", "create_clip_and_transforms", "register_model_configs", "tokenizer_for"]
