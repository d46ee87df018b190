"""Image towers as created, before anything is built on them: an open_clip image tower (a ViT, or the timm trunk
inside a timm tower such as MobileCLIP's MCi) or a timm model by name, with its weights, its input normalisation
and stochastic depth (`drop_path`).

- open_clip ViTs have no drop path of their own: each residual branch's LayerScale gets a timm DropPath (rates
  rising linearly over depth, as timm does; open_clip_adapter.add_vit_drop_path). A timm trunk inside an open_clip
  tower gets its `drop_path*` slots filled the same way (`retrofit_drop_path`).
- timm: `model_kwargs` reach `timm.create_model` (e.g. Swin's `img_size`); weights are a file (state dict,
  `.safetensors`, a checkpoint with `state_dict` / `model`), or `hf-hub:<repo>` / `local-dir:<dir>` in timm's
  layout. A plain timm ViT (one stride) is built at `img_size` (timm resamples a pretrained table on load) and
  takes any input size.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.layers import DropPath
from torch import nn

from clipdense.config import ConfigError
from clipdense.models import open_clip_adapter as oca
from clipdense.models.loading import folder_schema, open_clip_model

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TowerSpec:
    """What to create: the model's family ("open_clip" | "timm") and name, its weights (a reference, see
    models/loading.py), extra timm kwargs, the stochastic depth rate, and the crop a plain timm ViT is built at."""

    family: str
    name: str
    checkpoint: str | None = None
    model_kwargs: dict | None = None
    drop_path: float = 0.0
    img_size: tuple[int, int] | list[int] | None = None
    init_seed: int | None = None   # seeds the random init of a tower without weights


@dataclass(frozen=True)
class ImageTower:
    """A created tower: `module` is an open_clip VisionTransformer (`vit`, read through open_clip_adapter) or a timm
    model (`forward_intermediates`, `feature_info`); `mean` / `std` its input normalisation."""

    module: nn.Module
    vit: bool
    mean: tuple
    std: tuple
    drop_path_applied: bool


def create_tower(spec: TowerSpec) -> ImageTower:
    create = _open_clip_tower if spec.family == "open_clip" else _timm_tower
    if spec.init_seed is None or spec.checkpoint is not None:
        return create(spec)
    with torch.random.fork_rng(devices=[]):   # the caller's RNG stream stays as it was
        torch.manual_seed(spec.init_seed)
        return create(spec)


def _open_clip_tower(spec: TowerSpec) -> ImageTower:
    if spec.model_kwargs:
        raise ConfigError("backbone.model_kwargs: only timm backbones take them (this one is open_clip)")
    clip = open_clip_model(spec.name, spec.checkpoint)
    visual, trunk = clip.visual, oca.timm_trunk(clip.visual)
    pp = oca.preprocess_cfg(clip)
    mean, std = pp.get("mean", CLIP_MEAN), pp.get("std", CLIP_STD)
    if oca.is_vit(visual):
        if spec.drop_path > 0:
            oca.add_vit_drop_path(visual, spec.drop_path)
        return ImageTower(visual, True, mean, std, spec.drop_path > 0)
    if trunk is None:
        raise ConfigError(f"backbone {spec.name!r}: image tower {type(visual).__name__} is not supported "
                          "(open_clip ViTs and timm towers are)")
    applied = spec.drop_path > 0 and retrofit_drop_path(trunk, spec.drop_path) > 0
    return ImageTower(trunk, False, mean, std, applied)


def _timm_tower(spec: TowerSpec) -> ImageTower:
    kwargs = dict(spec.model_kwargs or {})
    if spec.drop_path > 0:
        kwargs["drop_path_rate"] = spec.drop_path
    model = timm_model(spec, kwargs)
    if len({f["reduction"] for f in model.feature_info}) == 1:  # plain ViT: any input size, table at the crop
        if spec.img_size is not None and "img_size" not in kwargs:
            kwargs["img_size"] = [int(v) for v in spec.img_size]
        model = timm_model(spec, {**kwargs, "dynamic_img_size": True})
    pc = getattr(model, "pretrained_cfg", {}) or {}
    return ImageTower(model, False, pc.get("mean", IMAGENET_MEAN), pc.get("std", IMAGENET_STD), spec.drop_path > 0)


def timm_model(spec: TowerSpec, kwargs: dict) -> nn.Module:
    """`timm.create_model(spec.name, **kwargs)` with `spec.checkpoint`'s weights; a failure is one line."""
    kwargs = {**kwargs, **_timm_weights(spec.checkpoint)}
    try:
        return timm.create_model(spec.name, **kwargs)
    except TypeError as e:
        raise ConfigError(f"backbone.model_kwargs {spec.model_kwargs or {}}: {spec.name!r} rejects them ({e})"
                          ) from None
    except (RuntimeError, ValueError, AssertionError, OSError, KeyError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"backbone {spec.name!r} checkpoint {spec.checkpoint!r}: {msg}") from None


def _timm_weights(checkpoint: str | None) -> dict:
    """timm.create_model kwargs that load `checkpoint`: an hf-hub repo, a folder in timm's layout, or a file."""
    schema = folder_schema(checkpoint)
    if schema == "hf-hub:":
        return {"pretrained": True, "pretrained_cfg_overlay": {"hf_hub_id": checkpoint[len(schema):],
                                                               "source": "hf-hub"}}
    if schema == "local-dir:":
        folder = Path(checkpoint[len(schema):])
        files = [folder / f for f in ("model.safetensors", "pytorch_model.bin") if (folder / f).is_file()]
        if not files:
            raise ConfigError(f"backbone.checkpoint {checkpoint}: no model.safetensors or pytorch_model.bin "
                              "(timm's folder layout)")
        return {"pretrained": True, "pretrained_cfg_overlay": {"file": str(files[0])}}
    if checkpoint:
        return {"pretrained": True, "pretrained_cfg_overlay": {"file": checkpoint}}
    return {}


def retrofit_drop_path(module: nn.Module, rate: float) -> int:
    """Give a built timm model stochastic depth: its `drop_path*` slots (Identity at rate 0) in order, rising to
    `rate`. Returns how many slots it filled."""
    slots = [(m, a) for m in module.modules() for a in ("drop_path", "drop_path1", "drop_path2")
             if isinstance(getattr(m, a, None), (nn.Identity, DropPath))]
    for i, (m, a) in enumerate(slots):
        setattr(m, a, DropPath(rate * i / max(len(slots) - 1, 1)))
    return len(slots)
