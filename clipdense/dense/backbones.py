"""Backbones with one interface: `forward(x) -> [4 maps at strides 4, 8, 16, 32]`, `.out_channels`, `.layer_id(name)`.

- open_clip ViT (`clipdense.models.create_clip(name, pretrained=...).visual`): tokens of 4 blocks (open_clip's
  `forward_intermediates`) -> maps -> Feature2Pyramid (or DPT's reassemble, `neck="dpt"`; ViTDet's, `"vitdet"`). As
  mmseg does, the position table is resized once at build time to the finetune crop's grid (`img_size`) and that
  table trains; at any other grid (whole-image evaluation) it is interpolated to the input grid, so any size
  (multiple of the patch) works. Plain timm ViTs get the same: built at `img_size` (timm resamples pretrained tables
  on load). A frozen trunk keeps its stored table. Drop path: open_clip blocks have none, so each residual branch's
  LayerScale is followed by a timm DropPath (rates rising linearly over depth, as timm does). Every access to
  open_clip's internals lives in `clipdense.models.open_clip_adapter`.
- timm models (by name, or the trunk of an open_clip timm tower such as MobileCLIP's MCi): `forward_intermediates`
  at the stages of reduction 4/8/16/32; plain timm ViTs (all one stride) also go through Feature2Pyramid.
  `backbone.model_kwargs` reach `timm.create_model` (e.g. Swin's `img_size`).
Weights (`backbone.checkpoint`, one key for all): open_clip: a pretrained tag, a checkpoint file, or a folder
`local-dir:<dir>` / `hf-hub:<repo>` (open_clip's own layout, what pretraining exports to `<out>/export/open_clip`);
timm: a weights file (state dict, `.safetensors`, a checkpoint with `state_dict` / `model`), or `hf-hub:<repo>` /
`local-dir:<dir>` (timm's layout; read from the HF cache when offline). Provenance `params` counts the trunk only
(no neck), the figure "N x smaller" compares.
Layer ids for layer-wise lr decay (dense/optim.py, `LayerIds`): for ViTs (open_clip, plain timm) `layer_id(name)`
here: 0 = stem (patch + position embedding, class token, pre-norm), i + 1 = block i, `num_layers - 1` = everything
else (neck, heads), so lr_scale = decay ** (num_layers - 1 - id). Hierarchical timm towers do not use `layer_id`:
optim.hierarchical_layer_ids gives them stage-level ids (stem 0, at most 12 ids over the stages' blocks, head last).
Detection (`neck="vitdet"`): a plain ViT's last block, once per level, through ViTDet's rescaling (necks.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import open_clip
import timm
import torch
from timm.layers import DropPath
from timm.models import group_parameters
from torch import nn

from clipdense.config import ConfigError
from clipdense.dense.config import BackboneConfig
from clipdense.dense.dpt import Reassemble
from clipdense.dense.necks import Feature2Pyramid, ViTDetRescale
from clipdense.models import open_clip_adapter as oca
from clipdense.models.registry import create_clip, register_model_configs

STRIDES = (4, 8, 16, 32)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def default_block_indices(depth: int) -> list[int]:
    """Blocks whose tokens feed the pyramid: mmseg's [3,5,7,11] for 12 blocks, [7,11,15,23] for 24, else evenly
    spaced."""
    known = {12: [3, 5, 7, 11], 24: [7, 11, 15, 23]}
    return known.get(depth, [max(0, round((k + 1) * depth / 4) - 1) for k in range(4)])


def dpt_block_indices(depth: int) -> list[int]:
    """DPT's taps: the last block of each quarter of the depth, [2, 5, 8, 11] for 12 blocks (the Toolbox's ViT-B)."""
    return [max(0, round((k + 1) * depth / 4) - 1) for k in range(4)]


def _pyramid_scales(patch: int) -> list[float]:
    scales = [patch / s for s in STRIDES]
    if patch < 1 or patch & (patch - 1):
        raise ConfigError(f"backbone: patch size {patch} is not a power of two; Feature2Pyramid cannot reach "
                          "strides 4-32")
    return scales


def _grid(img_size, patch: int) -> tuple[int, int]:
    h, w = (int(v) for v in img_size)
    if h % patch or w % patch:
        raise ConfigError(f"data.crop_size {[h, w]} is not a multiple of the backbone's patch size {patch}")
    return h // patch, w // patch


def plain_block_indices(neck: str, depth: int) -> list[int]:
    """The blocks a plain ViT's neck reads: DPT's, ViTDet's (the last block, once per level) or mmseg's."""
    if neck == "vitdet":
        return [depth - 1] * 4
    return (dpt_block_indices if neck == "dpt" else default_block_indices)(depth)


def _plain_neck(kind: str, width: int, patch: int) -> nn.Module:
    """Same-stride ViT maps -> strides 4-32: mmseg's Feature2Pyramid, DPT's reassemble (readout-projected), or
    ViTDet's rescaling of the last block (detection)."""
    if kind == "vitdet":
        return ViTDetRescale(width, _pyramid_scales(patch))
    if kind == "dpt":
        return Reassemble(width, _pyramid_scales(patch))
    neck = Feature2Pyramid(width, _pyramid_scales(patch))
    neck.out_channels = [width] * 4
    return neck


class _Freezable:
    """`freeze()` fixes the trunk (`self.trunk_name`): no gradients, and eval mode even inside `model.train()`."""

    frozen = False

    def freeze(self) -> None:
        self.frozen = True
        for p in getattr(self, self.trunk_name).parameters():
            p.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            getattr(self, self.trunk_name).eval()
        return self


class ViTPyramid(_Freezable, nn.Module):
    """An open_clip VisionTransformer as a 4-level pyramid backbone (open_clip access: models/open_clip_adapter.py)."""

    def __init__(self, vit: nn.Module, out_indices: list[int] | None = None, drop_path: float = 0.0,
                 img_size: tuple[int, int] | None = None, neck: str = "feature2pyramid"):
        super().__init__()
        shape = oca.vit_shape(vit)
        depth = shape.depth
        self.out_indices = list(out_indices) if out_indices else plain_block_indices(neck, depth)
        if any(not 0 <= i < depth for i in self.out_indices) or len(self.out_indices) != 4:
            raise ConfigError(f"backbone.out_indices {self.out_indices}: need 4 block indices in [0, {depth - 1}]")
        ph, pw = shape.patch
        if ph != pw:
            raise ConfigError(f"backbone: non-square patches {shape.patch} are not supported")
        oca.prune_vit(vit, self.out_indices)
        if img_size is not None:
            oca.resize_pos_table(vit, _grid(img_size, ph))
        self.vit = vit
        self.trunk_name = "vit"
        self.patch = ph
        self.depth = depth
        self.neck = _plain_neck(neck, shape.width, ph)
        self.out_channels = list(self.neck.out_channels)
        self.strides = list(STRIDES)
        self.num_layers = depth + 2
        if drop_path > 0:
            oca.add_vit_drop_path(vit, drop_path, depth)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if getattr(self.neck, "uses_cls", False):
            maps, cls = oca.vit_block_maps(self.vit, x, self.out_indices, with_cls=True)
            return self.neck(maps, cls)
        return self.neck(oca.vit_block_maps(self.vit, x, self.out_indices))

    def layer_id(self, name: str) -> int:
        i = oca.vit_layer_id(name[len("vit."):]) if name.startswith("vit.") else None
        return self.num_layers - 1 if i is None else i

    def no_weight_decay(self) -> set[str]:
        return {f"vit.{n}" for n in self.vit.no_weight_decay()}


class TimmPyramid(_Freezable, nn.Module):
    """A timm model (hierarchical, or plain ViT + Feature2Pyramid) as a 4-level pyramid backbone."""

    def __init__(self, model: nn.Module, out_indices: list[int] | None = None, neck: str = "feature2pyramid"):
        super().__init__()
        info = list(model.feature_info)
        reductions = [int(f["reduction"]) for f in info]
        self.plain = len(set(reductions)) == 1
        if out_indices is None:
            if self.plain:
                out_indices = plain_block_indices(neck, len(info))
            else:
                missing = [s for s in STRIDES if s not in reductions]
                if missing:
                    raise ConfigError(f"backbone: timm model has no stage at stride {missing} (stages: {reductions})")
                out_indices = [max(i for i, r in enumerate(reductions) if r == s) for s in STRIDES]
        if len(out_indices) != 4 or any(not 0 <= i < len(info) for i in out_indices):
            raise ConfigError(f"backbone.out_indices {out_indices}: need 4 feature indices in [0, {len(info) - 1}]")
        self.out_indices = list(out_indices)
        self._take = sorted(set(self.out_indices))  # timm takes each index once; a repeated one is reused
        model.prune_intermediate_layers(self._take, prune_norm=True, prune_head=True)
        self.model = model
        self.trunk_name = "model"
        chans = [int(info[i]["num_chs"]) for i in self.out_indices]
        self.neck = _plain_neck(neck, chans[0], reductions[0]) if self.plain else None
        self.out_channels = list(self.neck.out_channels) if self.plain else chans
        self.strides = list(STRIDES)
        groups = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
        self._layer = {f"model.{n}": int(g) for n, g in groups.items()}
        self.num_layers = (max(self._layer.values()) if self._layer else 0) + 2

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if getattr(self.neck, "uses_cls", False):
            out = dict(zip(self._take, self.model.forward_intermediates(x, indices=self._take, intermediates_only=True,
                                                                        return_prefix_tokens=True)))
            return self.neck([out[i][0] for i in self.out_indices], [out[i][1][:, 0] for i in self.out_indices])
        out = dict(zip(self._take, self.model.forward_intermediates(x, indices=self._take, intermediates_only=True)))
        feats = [out[i] for i in self.out_indices]
        return self.neck(feats) if self.neck is not None else feats

    def layer_id(self, name: str) -> int:
        return self._layer.get(name, self.num_layers - 1)

    def no_weight_decay(self) -> set[str]:
        fn = getattr(self.model, "no_weight_decay", None)
        return {f"model.{n}" for n in fn()} if callable(fn) else set()


def _retrofit_drop_path(module: nn.Module, rate: float) -> int:
    """Give a built timm model stochastic depth: its `drop_path*` slots (Identity at rate 0) in order, rising to
    `rate`."""
    slots = [(m, a) for m in module.modules() for a in ("drop_path", "drop_path1", "drop_path2")
             if isinstance(getattr(m, a, None), (nn.Identity, DropPath))]
    for i, (m, a) in enumerate(slots):
        setattr(m, a, DropPath(rate * i / max(len(slots) - 1, 1)))
    return len(slots)


SCHEMAS = ("local-dir:", "hf-hub:")


def _schema(ckpt: str | None) -> str | None:
    return next((p for p in SCHEMAS if ckpt and ckpt.startswith(p)), None)


def resolve_kind(cfg: BackboneConfig) -> str:
    if cfg.kind != "auto":
        return cfg.kind
    register_model_configs()
    if cfg.name in open_clip.list_models():
        return "open_clip"
    if timm.is_model(cfg.name):
        return "timm"
    raise ConfigError(f"backbone.name {cfg.name!r} is neither an open_clip nor a timm model")


def _check_checkpoint(ckpt: str | None) -> None:
    schema = _schema(ckpt)
    if schema == "local-dir:" and not Path(ckpt[len(schema):]).is_dir():
        raise ConfigError(f"backbone.checkpoint: folder not found: {ckpt[len(schema):]}")
    if not schema and ckpt and ("/" in ckpt or Path(ckpt).suffix in {".pt", ".pth", ".bin", ".safetensors"}) \
            and not Path(ckpt).exists():
        raise ConfigError(f"backbone.checkpoint: file not found: {ckpt}")


def _open_clip_model(cfg: BackboneConfig):
    """The named open_clip model with `backbone.checkpoint`'s weights; a `local-dir:` / `hf-hub:` folder is open_clip's
    own layout (config + weights), and its image tower must be the named model's."""
    schema = _schema(cfg.checkpoint)
    if not schema:
        return create_clip(cfg.name, pretrained=cfg.checkpoint)
    register_model_configs()
    named = (open_clip.get_model_config(cfg.name) or {}).get("vision_cfg")
    if schema == "local-dir:":
        cfg_file = Path(cfg.checkpoint[len(schema):]) / "open_clip_config.json"
        if not cfg_file.is_file():
            raise ConfigError(f"backbone.checkpoint {cfg.checkpoint}: no open_clip_config.json (open_clip's layout; "
                              "pretraining writes it to <out>/export/open_clip)")
        folder = json.loads(cfg_file.read_text())
        if named is not None and folder.get("model_cfg", {}).get("vision_cfg") != named:
            raise ConfigError(f"backbone.checkpoint {cfg.checkpoint}: its image tower is not {cfg.name!r}'s "
                              "(vision_cfg differs)")
    return open_clip.create_model(cfg.checkpoint)


def _timm_model(cfg: BackboneConfig, kwargs: dict):
    schema = _schema(cfg.checkpoint)
    if schema == "hf-hub:":
        kwargs = {**kwargs, "pretrained": True, "pretrained_cfg_overlay": {"hf_hub_id": cfg.checkpoint[len(schema):],
                                                                          "source": "hf-hub"}}
    elif schema == "local-dir:":
        folder = Path(cfg.checkpoint[len(schema):])
        files = [folder / f for f in ("model.safetensors", "pytorch_model.bin") if (folder / f).is_file()]
        if not files:
            raise ConfigError(f"backbone.checkpoint {cfg.checkpoint}: no model.safetensors or pytorch_model.bin "
                              "(timm's folder layout)")
        kwargs = {**kwargs, "pretrained": True, "pretrained_cfg_overlay": {"file": str(files[0])}}
    elif cfg.checkpoint:
        kwargs = {**kwargs, "pretrained": True, "pretrained_cfg_overlay": {"file": cfg.checkpoint}}
    try:
        return timm.create_model(cfg.name, **kwargs)
    except TypeError as e:
        raise ConfigError(f"backbone.model_kwargs {cfg.model_kwargs}: {cfg.name!r} rejects them ({e})") from None
    except (RuntimeError, ValueError, AssertionError, OSError, KeyError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"backbone {cfg.name!r} checkpoint {cfg.checkpoint!r}: {msg}") from None


@dataclass(frozen=True)
class BackboneSpec:
    """A finetune's backbone resolved once, where the stage starts: its config, open_clip or timm (`kind`, the
    checkpoint checked), the crop grid a ViT's position table is resized to, the neck. `build()` makes it (in each
    training worker)."""

    cfg: BackboneConfig
    kind: str
    img_size: tuple[int, int] | list[int] | None = None
    neck: str = "feature2pyramid"

    def build(self) -> nn.Module:
        """The pyramid backbone, carrying `.provenance` (name, kind, checkpoint, trunk params), `.mean`, `.std`."""
        cfg = self.cfg
        net, mean, std, drop_path_applied = (_open_clip_pyramid if self.kind == "open_clip" else _timm_pyramid)(self)
        if cfg.frozen:
            net.freeze()
        net.mean = tuple(float(v) for v in (cfg.mean or mean))
        net.std = tuple(float(v) for v in (cfg.std or std))
        trunk_params = sum(p.numel() for p in getattr(net, net.trunk_name).parameters())
        net.provenance = {"name": cfg.name, "kind": self.kind, "checkpoint": cfg.checkpoint, "params": trunk_params,
                          "neck_params": sum(p.numel() for p in net.parameters()) - trunk_params,
                          "out_channels": list(net.out_channels),
                          "drop_path": cfg.drop_path if drop_path_applied else 0.0, "frozen": cfg.frozen}
        return net


def resolve_backbone(cfg: BackboneConfig, img_size: tuple[int, int] | list[int] | None = None,
                     neck: str = "feature2pyramid") -> BackboneSpec:
    """`img_size`: the finetune crop, whose grid a ViT's position table is resized to once. `neck`: how a plain
    ViT's one-stride maps become a pyramid ("feature2pyramid" | "dpt" | "vitdet")."""
    kind = resolve_kind(cfg)
    _check_checkpoint(cfg.checkpoint)
    if cfg.frozen:  # nothing trains: keep the table bit-identical to the checkpoint (interpolating it gives the same)
        img_size = None
    return BackboneSpec(cfg, kind, img_size, neck)


def create_backbone(cfg: BackboneConfig, img_size: tuple[int, int] | list[int] | None = None,
                    neck: str = "feature2pyramid") -> nn.Module:
    """Build the pyramid backbone `cfg` names (see `resolve_backbone` and `BackboneSpec.build`)."""
    return resolve_backbone(cfg, img_size, neck).build()


def _open_clip_pyramid(spec: BackboneSpec) -> tuple[nn.Module, tuple, tuple, bool]:
    """(pyramid, mean, std, drop path applied) of an open_clip image tower: a ViT, or a timm trunk inside it."""
    cfg = spec.cfg
    if cfg.model_kwargs:
        raise ConfigError("backbone.model_kwargs: only timm backbones take them (this one is open_clip)")
    try:
        clip = _open_clip_model(cfg)
    except (RuntimeError, ValueError, FileNotFoundError) as e:
        raise ConfigError(f"backbone {cfg.name!r} checkpoint {cfg.checkpoint!r}: {str(e).splitlines()[0]}") from None
    visual, trunk = clip.visual, oca.timm_trunk(clip.visual)
    pp = oca.preprocess_cfg(clip)
    mean, std = pp.get("mean", CLIP_MEAN), pp.get("std", CLIP_STD)
    drop_path_applied = cfg.drop_path > 0
    if oca.is_vit(visual):
        net = ViTPyramid(visual, cfg.out_indices, cfg.drop_path, spec.img_size, spec.neck)
    elif trunk is not None:
        if cfg.drop_path > 0:
            drop_path_applied = _retrofit_drop_path(trunk, cfg.drop_path) > 0
        net = TimmPyramid(trunk, cfg.out_indices, spec.neck)
    else:
        raise ConfigError(f"backbone {cfg.name!r}: image tower {type(visual).__name__} is not supported "
                          "(open_clip ViTs and timm towers are)")
    return net, mean, std, drop_path_applied


def _timm_pyramid(spec: BackboneSpec) -> tuple[nn.Module, tuple, tuple, bool]:
    """(pyramid, mean, std, drop path applied) of a timm model."""
    cfg, img_size = spec.cfg, spec.img_size
    kwargs = dict(cfg.model_kwargs)
    if cfg.drop_path > 0:
        kwargs["drop_path_rate"] = cfg.drop_path
    model = _timm_model(cfg, kwargs)
    if len({f["reduction"] for f in model.feature_info}) == 1:  # plain ViT: any input size, table at the crop
        if img_size is not None and "img_size" not in kwargs:
            kwargs["img_size"] = [int(v) for v in img_size]
        model = _timm_model(cfg, {**kwargs, "dynamic_img_size": True})
    pc = getattr(model, "pretrained_cfg", {}) or {}
    mean, std = pc.get("mean", (0.485, 0.456, 0.406)), pc.get("std", (0.229, 0.224, 0.225))
    return TimmPyramid(model, cfg.out_indices, spec.neck), mean, std, cfg.drop_path > 0


def backbone_family(backbone: nn.Module) -> str:
    """"hierarchical" for a timm tower with stages at several strides, else "vit" (layer-decay ids, detection's
    pyramid)."""
    return "hierarchical" if isinstance(backbone, TimmPyramid) and not backbone.plain else "vit"
