"""open_clip model creation with clipdense's own configs (`configs/models/*.json`) registered.

`clip-tiny` and `coca-tiny` (2 layers, width 64, 64 px) let CPU tests build real open_clip models in milliseconds.
`clip-demo` / `coca-demo` (the demo's models) use the first 8000 merges of CLIP's own BPE (`bpe_simple_8k.txt.gz`,
vocabulary 8514 instead of 49408): the synthetic world's words stay whole tokens, and the vocabulary projection,
which dominates a small CoCa's step on CPU, is 5.8x cheaper.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import open_clip

from clipdense.config import configs_dir
from clipdense.models.open_clip_adapter import init_unset_parameters, register_model_config


@functools.lru_cache(maxsize=None)
def register_model_configs(extra_dir: str | None = None) -> tuple[str, ...]:
    """Register every JSON in configs/models (and `extra_dir`) with open_clip; returns the names."""
    dirs = [configs_dir() / "models"] + ([Path(extra_dir)] if extra_dir else [])
    names = []
    for d in dirs:
        for p in sorted(Path(d).glob("*.json")):
            cfg = json.loads(p.read_text())
            kwargs = cfg.get("text_cfg", {}).get("tokenizer_kwargs") or {}
            if "bpe_path" in kwargs:  # a shipped (smaller) BPE vocabulary, named relative to the JSON
                kwargs["bpe_path"] = str((p.parent / kwargs["bpe_path"]).resolve())
            register_model_config(p.stem, cfg)  # the resolved dict, not the file: see open_clip_adapter
            names.append(p.stem)
    return tuple(names)


def _check_name(name: str) -> None:
    register_model_configs()
    if name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {name!r} (see open_clip.list_models() or configs/models/)")


def create_clip(name: str, pretrained: str | None = None, **kwargs):
    """An open_clip model by name; `pretrained` is an open_clip tag or a local checkpoint path."""
    _check_name(name)
    if pretrained:
        return open_clip.create_model(name, pretrained=pretrained, **kwargs)
    model = open_clip.create_model(name, **kwargs)
    init_unset_parameters(model)
    return model


def create_clip_and_transforms(name: str, pretrained: str | None = None, **kwargs):
    """(model, train_transform, eval_transform) as open_clip builds them."""
    _check_name(name)
    model, train_tf, eval_tf = open_clip.create_model_and_transforms(name, pretrained=pretrained or None, **kwargs)
    if not pretrained:
        init_unset_parameters(model)
    return model, train_tf, eval_tf


def tokenizer_for(name: str):
    _check_name(name)
    return open_clip.get_tokenizer(name)
