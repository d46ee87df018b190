"""Backbones with one interface: `forward(x) -> [4 maps at strides 4, 8, 16, 32]`, `.out_channels`, `.layer_id(name)`.

- open_clip ViT (`clipdense.models.create_clip(name, pretrained=...).visual`): tokens of 4 blocks -> maps ->
  Feature2Pyramid; the positional embedding is interpolated to the input grid, so any size (multiple of the patch) works.
  Drop path: open_clip blocks have none, so each residual branch's LayerScale (`ls_1`, `ls_2`) is followed by a
  timm DropPath (rates rising linearly over depth, as timm does).
- timm models (by name, or the trunk of an open_clip timm tower such as MobileCLIP's MCi): `forward_intermediates`
  at the stages of reduction 4/8/16/32; plain timm ViTs (all one stride) also go through Feature2Pyramid.
Layer ids for layer-wise lr decay: 0 = stem / patch+pos embed + cls token, i+1 = block (or timm group) i, and
`num_layers - 1` = everything else (neck, heads), so lr_scale = decay ** (num_layers - 1 - id).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from clipdense.dense.config import BackboneConfig
from clipdense.dense.necks import Feature2Pyramid
from clipdense.errors import ConfigError

STRIDES = (4, 8, 16, 32)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def default_block_indices(depth: int) -> list[int]:
    """Blocks whose tokens feed the pyramid: mmseg's [3,5,7,11] for 12 blocks, [7,11,15,23] for 24, else evenly spaced."""
    known = {12: [3, 5, 7, 11], 24: [7, 11, 15, 23]}
    return known.get(depth, [max(0, round((k + 1) * depth / 4) - 1) for k in range(4)])


def _pyramid_scales(patch: int) -> list[float]:
    scales = [patch / s for s in STRIDES]
    if patch < 1 or patch & (patch - 1):
        raise ConfigError(f"backbone: patch size {patch} is not a power of two; Feature2Pyramid cannot reach strides 4-32")
    return scales


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
    """An open_clip VisionTransformer as a 4-level pyramid backbone."""

    def __init__(self, vit: nn.Module, out_indices: list[int] | None = None, drop_path: float = 0.0):
        super().__init__()
        depth = len(vit.transformer.resblocks)
        self.out_indices = list(out_indices) if out_indices else default_block_indices(depth)
        if any(not 0 <= i < depth for i in self.out_indices) or len(self.out_indices) != 4:
            raise ConfigError(f"backbone.out_indices {self.out_indices}: need 4 block indices in [0, {depth - 1}]")
        ph, pw = vit.patch_size
        if ph != pw:
            raise ConfigError(f"backbone: non-square patches {vit.patch_size} are not supported")
        # Parts the pyramid never calls would be parameters without gradients (DDP rejects those): drop them.
        vit.proj, vit.ln_post = None, nn.Identity()
        vit.attn_pool = vit.attn_pool_contrastive = None
        vit.transformer.resblocks = vit.transformer.resblocks[: max(self.out_indices) + 1]
        self.vit = vit
        self.trunk_name = "vit"
        self.patch = ph
        self.depth = depth
        width = vit.conv1.out_channels
        self.neck = Feature2Pyramid(width, _pyramid_scales(ph))
        self.out_channels = [width] * 4
        self.strides = list(STRIDES)
        self.num_layers = depth + 2
        if drop_path > 0:
            n = len(vit.transformer.resblocks)
            for i, blk in enumerate(vit.transformer.resblocks):
                rate = drop_path * i / max(depth - 1, 1)
                blk.ls_1 = nn.Sequential(blk.ls_1, DropPath(rate))
                blk.ls_2 = nn.Sequential(blk.ls_2, DropPath(rate))
            assert n == len(vit.transformer.resblocks)

    def pos_embed(self, gh: int, gw: int) -> torch.Tensor:
        pos = self.vit.positional_embedding
        g0 = tuple(self.vit.grid_size)
        if (gh, gw) == g0:
            return pos
        grid = pos[1:].reshape(1, g0[0], g0[1], -1).permute(0, 3, 1, 2).float()
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False).to(pos.dtype)
        return torch.cat([pos[:1], grid.flatten(2).transpose(1, 2)[0]], dim=0)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        v = self.vit
        b = x.shape[0]
        x = v.conv1(x)
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).expand(b, 1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed(gh, gw).to(x.dtype)
        x = v.ln_pre(x)  # (open_clip's patch dropout is a CLIP-pretraining trick: not used for dense tasks)
        batch_first = getattr(v.transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)
        taken: dict[int, torch.Tensor] = {}
        for i, blk in enumerate(v.transformer.resblocks):
            x = blk(x)
            if i in self.out_indices:
                t = x if batch_first else x.transpose(0, 1)
                taken[i] = t[:, 1:].transpose(1, 2).reshape(b, -1, gh, gw)
        return self.neck([taken[i] for i in self.out_indices])

    def layer_id(self, name: str) -> int:
        if name.startswith(("vit.conv1", "vit.class_embedding", "vit.positional_embedding", "vit.ln_pre")):
            return 0
        m = re.match(r"vit\.transformer\.resblocks\.(\d+)\.", name)
        return int(m.group(1)) + 1 if m else self.num_layers - 1

    def no_weight_decay(self) -> set[str]:
        return {"vit.positional_embedding", "vit.class_embedding"}


class TimmPyramid(_Freezable, nn.Module):
    """A timm model (hierarchical, or plain ViT + Feature2Pyramid) as a 4-level pyramid backbone."""

    def __init__(self, model: nn.Module, out_indices: list[int] | None = None):
        super().__init__()
        from timm.models import group_parameters

        info = list(model.feature_info)
        reductions = [int(f["reduction"]) for f in info]
        self.plain = len(set(reductions)) == 1
        if out_indices is None:
            if self.plain:
                out_indices = default_block_indices(len(info))
            else:
                missing = [s for s in STRIDES if s not in reductions]
                if missing:
                    raise ConfigError(f"backbone: timm model has no stage at stride {missing} (stages: {reductions})")
                out_indices = [max(i for i, r in enumerate(reductions) if r == s) for s in STRIDES]
        if len(out_indices) != 4 or any(not 0 <= i < len(info) for i in out_indices):
            raise ConfigError(f"backbone.out_indices {out_indices}: need 4 feature indices in [0, {len(info) - 1}]")
        self.out_indices = list(out_indices)
        model.prune_intermediate_layers(self.out_indices, prune_norm=True, prune_head=True)
        self.model = model
        self.trunk_name = "model"
        chans = [int(info[i]["num_chs"]) for i in self.out_indices]
        self.neck = Feature2Pyramid(chans[0], _pyramid_scales(reductions[0])) if self.plain else None
        self.out_channels = chans
        self.strides = list(STRIDES)
        groups = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
        self._layer = {f"model.{n}": int(g) for n, g in groups.items()}
        self.num_layers = (max(self._layer.values()) if self._layer else 0) + 2

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.model.forward_intermediates(x, indices=self.out_indices, intermediates_only=True)
        return self.neck(feats) if self.neck is not None else list(feats)

    def layer_id(self, name: str) -> int:
        return self._layer.get(name, self.num_layers - 1)

    def no_weight_decay(self) -> set[str]:
        fn = getattr(self.model, "no_weight_decay", None)
        return {f"model.{n}" for n in fn()} if callable(fn) else set()


def _retrofit_drop_path(module: nn.Module, rate: float) -> int:
    """Give a built timm model stochastic depth: its `drop_path*` slots (Identity at rate 0) in order, rising to `rate`."""
    slots = [(m, a) for m in module.modules() for a in ("drop_path", "drop_path1", "drop_path2")
             if isinstance(getattr(m, a, None), (nn.Identity, DropPath))]
    for i, (m, a) in enumerate(slots):
        setattr(m, a, DropPath(rate * i / max(len(slots) - 1, 1)))
    return len(slots)


def resolve_kind(cfg: BackboneConfig) -> str:
    if cfg.kind != "auto":
        return cfg.kind
    import open_clip
    import timm

    from clipdense.models.registry import register_model_configs

    register_model_configs()
    if cfg.name in open_clip.list_models():
        return "open_clip"
    if timm.is_model(cfg.name):
        return "timm"
    raise ConfigError(f"backbone.name {cfg.name!r} is neither an open_clip nor a timm model")


def _check_checkpoint(ckpt: str | None) -> None:
    if ckpt and ("/" in ckpt or Path(ckpt).suffix in {".pt", ".pth", ".bin", ".safetensors"}) and not Path(ckpt).exists():
        raise ConfigError(f"backbone.checkpoint: file not found: {ckpt}")


def create_backbone(cfg: BackboneConfig) -> nn.Module:
    """Build the pyramid backbone `cfg` names; it carries `.provenance` (name, kind, checkpoint, params), `.mean`, `.std`."""
    kind = resolve_kind(cfg)
    _check_checkpoint(cfg.checkpoint)
    drop_path_applied = cfg.drop_path > 0
    if kind == "open_clip":
        from clipdense.models.registry import create_clip

        try:
            clip = create_clip(cfg.name, pretrained=cfg.checkpoint)
        except (RuntimeError, ValueError) as e:
            raise ConfigError(f"backbone {cfg.name!r} checkpoint {cfg.checkpoint!r}: {str(e).splitlines()[0]}") from None
        visual = clip.visual
        pp = getattr(visual, "preprocess_cfg", {}) or {}
        mean, std = pp.get("mean", CLIP_MEAN), pp.get("std", CLIP_STD)
        if hasattr(visual, "transformer") and hasattr(visual, "conv1"):
            net = ViTPyramid(visual, cfg.out_indices, cfg.drop_path)
        elif hasattr(visual, "trunk"):
            if cfg.drop_path > 0:
                drop_path_applied = _retrofit_drop_path(visual.trunk, cfg.drop_path) > 0
            net = TimmPyramid(visual.trunk, cfg.out_indices)
        else:
            raise ConfigError(f"backbone {cfg.name!r}: image tower {type(visual).__name__} is not supported "
                              "(open_clip ViTs and timm towers are)")
        del clip
    else:
        import timm

        kwargs = {"drop_path_rate": cfg.drop_path} if cfg.drop_path > 0 else {}
        if cfg.checkpoint:
            kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": cfg.checkpoint})
        try:
            model = timm.create_model(cfg.name, **kwargs)
        except RuntimeError as e:
            raise ConfigError(f"backbone {cfg.name!r} checkpoint {cfg.checkpoint!r}: {str(e).splitlines()[0]}") from None
        if len({f["reduction"] for f in model.feature_info}) == 1:  # plain ViT: let it take any input size
            model = timm.create_model(cfg.name, dynamic_img_size=True, **kwargs)
        pc = getattr(model, "pretrained_cfg", {}) or {}
        mean, std = pc.get("mean", (0.485, 0.456, 0.406)), pc.get("std", (0.229, 0.224, 0.225))
        net = TimmPyramid(model, cfg.out_indices)
    if cfg.frozen:
        net.freeze()
    net.mean = tuple(float(v) for v in (cfg.mean or mean))
    net.std = tuple(float(v) for v in (cfg.std or std))
    net.provenance = {"name": cfg.name, "kind": kind, "checkpoint": cfg.checkpoint,
                      "params": sum(p.numel() for p in net.parameters()),
                      "out_channels": list(net.out_channels), "drop_path": cfg.drop_path if drop_path_applied else 0.0,
                      "frozen": cfg.frozen}
    return net
