"""A model named in a config, loaded by reference: which family the name belongs to (open_clip or timm), the
checkpoint reference checked before any worker starts, and an open_clip model with the weights the reference names.

A reference (one config key for both families) is a pretrained tag, a weights file, or a folder: `local-dir:<dir>`
or `hf-hub:<repo>`. For open_clip the folder is open_clip's own layout (config + weights: what pretraining exports
to `<out>/export/open_clip`); for timm it is timm's (models/towers.py; read from the HF cache when offline).
Errors are one-line ConfigErrors naming the config key at fault: `backbone.*`, the section (dense finetuning's)
that names models this way.
"""
from __future__ import annotations

import json
from pathlib import Path

import open_clip
import timm
from torch import nn

from clipdense.config import ConfigError
from clipdense.models.registry import create_clip, register_model_configs

FOLDER_SCHEMAS = ("local-dir:", "hf-hub:")
WEIGHT_SUFFIXES = {".pt", ".pth", ".bin", ".safetensors"}


def folder_schema(checkpoint: str | None) -> str | None:
    """`local-dir:` or `hf-hub:` when `checkpoint` names a folder that way, else None."""
    return next((p for p in FOLDER_SCHEMAS if checkpoint and checkpoint.startswith(p)), None)


def model_family(name: str, kind: str = "auto") -> str:
    """The family that creates `name`, "open_clip" or "timm": `kind` itself unless it is "auto"; then open_clip if it
    knows the name, else timm."""
    if kind != "auto":
        return kind
    register_model_configs()
    if name in open_clip.list_models():
        return "open_clip"
    if timm.is_model(name):
        return "timm"
    raise ConfigError(f"backbone.name {name!r} is neither an open_clip nor a timm model")


def check_checkpoint(checkpoint: str | None) -> None:
    """A `local-dir:` folder or a weights file that is not there is a one-line error (a tag is left to the
    library)."""
    schema = folder_schema(checkpoint)
    if schema == "local-dir:" and not Path(checkpoint[len(schema):]).is_dir():
        raise ConfigError(f"backbone.checkpoint: folder not found: {checkpoint[len(schema):]}")
    names_a_file = bool(checkpoint) and ("/" in checkpoint or Path(checkpoint).suffix in WEIGHT_SUFFIXES)
    if not schema and names_a_file and not Path(checkpoint).exists():
        raise ConfigError(f"backbone.checkpoint: file not found: {checkpoint}")


def open_clip_model(name: str, checkpoint: str | None) -> nn.Module:
    """The named open_clip model with `checkpoint`'s weights; one that does not load is a one-line ConfigError."""
    try:
        return _open_clip_model(name, checkpoint)
    except (RuntimeError, ValueError, FileNotFoundError) as e:
        raise ConfigError(f"backbone {name!r} checkpoint {checkpoint!r}: {str(e).splitlines()[0]}") from None


def _open_clip_model(name: str, checkpoint: str | None) -> nn.Module:
    """A `local-dir:` / `hf-hub:` folder is open_clip's own layout (config + weights), and its image tower must be
    the named model's."""
    schema = folder_schema(checkpoint)
    if not schema:
        return create_clip(name, pretrained=checkpoint)
    register_model_configs()
    named = (open_clip.get_model_config(name) or {}).get("vision_cfg")
    if schema == "local-dir:":
        cfg_file = Path(checkpoint[len(schema):]) / "open_clip_config.json"
        if not cfg_file.is_file():
            raise ConfigError(f"backbone.checkpoint {checkpoint}: no open_clip_config.json (open_clip's layout; "
                              "pretraining writes it to <out>/export/open_clip)")
        folder = json.loads(cfg_file.read_text())
        if named is not None and folder.get("model_cfg", {}).get("vision_cfg") != named:
            raise ConfigError(f"backbone.checkpoint {checkpoint}: its image tower is not {name!r}'s "
                              "(vision_cfg differs)")
    return open_clip.create_model(checkpoint)
