"""Backbones with one interface: `forward(x) -> [4 maps at strides 4, 8, 16, 32]`, `.out_channels`, `.layer_id(name)`.

A backbone is a trunk that models/ creates (`models.towers.create_tower`: the open_clip or timm model, its weights
from `backbone.checkpoint`, stochastic depth) assembled here with a neck:
- open_clip ViT: tokens of 4 blocks (open_clip's `forward_intermediates`) -> maps -> Feature2Pyramid (or DPT's
  reassemble, `neck="dpt"`; ViTDet's rescaling, `"vitdet"`: a plain ViT's last block, once per level). As mmseg
  does, the position table is resized once at build time to the finetune crop's grid (`img_size`) and that table
  trains; at any other grid (whole-image evaluation) it is interpolated to the input grid, so any size (multiple of
  the patch) works. Plain timm ViTs get the same (models/ builds them at `img_size`). A frozen trunk keeps its
  stored table. Every access to open_clip's internals lives in `clipdense.models.open_clip_adapter`.
- timm models (by name, or the trunk of an open_clip timm tower such as MobileCLIP's MCi): `forward_intermediates`
  at the stages of reduction 4/8/16/32; plain timm ViTs (all one stride) also go through a neck.
Provenance `params` counts the trunk only (no neck), the figure "N x smaller" compares.
Layer ids for layer-wise lr decay (dense/optim.py, `LayerIds`): for ViTs (open_clip, plain timm) `layer_id(name)`
here: 0 = stem (patch + position embedding, class token, pre-norm), i + 1 = block i, `num_layers - 1` = everything
else (neck, heads), so lr_scale = decay ** (num_layers - 1 - id). Hierarchical timm towers do not use `layer_id`:
optim.hierarchical_layer_ids gives them stage-level ids (stem 0, at most 12 ids over the stages' blocks, head last).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.models import group_parameters
from torch import nn

from clipdense.config import ConfigError
from clipdense.dense.base_config import BackboneConfig
from clipdense.dense.necks import Feature2Pyramid, Reassemble, ViTDetRescale
from clipdense.models import open_clip_adapter as oca
from clipdense.models.loading import check_checkpoint, model_family
from clipdense.models.towers import ImageTower, TowerSpec, create_tower

STRIDES = (4, 8, 16, 32)


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
    """An open_clip VisionTransformer as a 4-level pyramid backbone (open_clip access: models/open_clip_adapter.py):
    blocks after the last tapped one pruned, the position table resized to `img_size`'s grid, a neck."""

    def __init__(self, vit: nn.Module, out_indices: list[int] | None = None, img_size: tuple[int, int] | None = None,
                 neck: str = "feature2pyramid"):
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


@dataclass(frozen=True)
class BackboneSpec:
    """A finetune's backbone resolved once, where the stage starts: its config, open_clip or timm (`kind`, the
    checkpoint checked), the crop grid a ViT's position table is resized to, the neck. `build()` makes it (in each
    training worker)."""

    cfg: BackboneConfig
    kind: str
    img_size: tuple[int, int] | list[int] | None = None
    neck: str = "feature2pyramid"

    def tower(self) -> TowerSpec:
        """What models/ creates: the trunk, its weights and stochastic depth."""
        cfg = self.cfg
        return TowerSpec(self.kind, cfg.name, cfg.checkpoint, cfg.model_kwargs, cfg.drop_path, self.img_size,
                         cfg.init_seed)

    def build(self) -> nn.Module:
        """The trunk models/ creates, with its neck: carrying `.provenance` (name, kind, checkpoint, trunk params),
        `.mean`, `.std`."""
        tower = create_tower(self.tower())
        net = assemble(tower, self.cfg.out_indices, self.img_size, self.neck)
        describe(net, tower, self.cfg, self.kind)
        return net


def assemble(tower: ImageTower, out_indices: list[int] | None, img_size, neck: str) -> nn.Module:
    """Trunk + neck: the pyramid wrapper of an open_clip ViT or of a timm model."""
    if tower.vit:
        return ViTPyramid(tower.module, out_indices, img_size, neck)
    return TimmPyramid(tower.module, out_indices, neck)


def describe(net: nn.Module, tower: ImageTower, cfg: BackboneConfig, kind: str) -> None:
    """Freeze the trunk if asked; set the input normalisation and the provenance metrics.json records."""
    if cfg.frozen:
        net.freeze()
    net.mean = tuple(float(v) for v in (cfg.mean or tower.mean))
    net.std = tuple(float(v) for v in (cfg.std or tower.std))
    trunk_params = sum(p.numel() for p in getattr(net, net.trunk_name).parameters())
    net.provenance = {"name": cfg.name, "kind": kind, "checkpoint": cfg.checkpoint, "params": trunk_params,
                      "neck_params": sum(p.numel() for p in net.parameters()) - trunk_params,
                      "out_channels": list(net.out_channels),
                      "drop_path": cfg.drop_path if tower.drop_path_applied else 0.0, "frozen": cfg.frozen}


def resolve_backbone(cfg: BackboneConfig, img_size: tuple[int, int] | list[int] | None = None,
                     neck: str = "feature2pyramid") -> BackboneSpec:
    """`img_size`: the finetune crop, whose grid a ViT's position table is resized to once. `neck`: how a plain
    ViT's one-stride maps become a pyramid ("feature2pyramid" | "dpt" | "vitdet")."""
    kind = model_family(cfg.name, cfg.kind)
    check_checkpoint(cfg.checkpoint)
    if cfg.frozen:  # nothing trains: keep the table bit-identical to the checkpoint (interpolating it gives the same)
        img_size = None
    return BackboneSpec(cfg, kind, img_size, neck)


def create_backbone(cfg: BackboneConfig, img_size: tuple[int, int] | list[int] | None = None,
                    neck: str = "feature2pyramid") -> nn.Module:
    """Build the pyramid backbone `cfg` names (see `resolve_backbone` and `BackboneSpec.build`)."""
    return resolve_backbone(cfg, img_size, neck).build()


def backbone_family(backbone: nn.Module) -> str:
    """The family layer decay and detection's pyramid go by: "hierarchical" for a timm tower with stages at several
    strides, else "vit"."""
    return "hierarchical" if isinstance(backbone, TimmPyramid) and not backbone.plain else "vit"
