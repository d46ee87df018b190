"""Necks: Feature2Pyramid (plain ViT tokens -> strides 4/8/16/32), ViTDet's simple feature pyramid for detection
(its rescaling from one block, `ViTDetRescale`, and its per-level 1x1 + 3x3 LayerNorm convs + max-pooled level,
`SimpleFeaturePyramid`), and torchvision's FPN for hierarchical towers (`TowerFPN`)."""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


def _rescale(channels: int, scale: float) -> nn.Module:
    """mmseg Feature2Pyramid ops generalised to any power-of-two scale: x4 = ConvT->BN->GELU->ConvT, x2 = ConvT,
    x1 = identity, x0.5 = MaxPool(2) (x0.25 = MaxPool(4), for patch-8 ViTs)."""
    if scale == 1:
        return nn.Identity()
    if scale < 1:
        k = round(1 / scale)
        return nn.MaxPool2d(kernel_size=k, stride=k)
    n = round(math.log2(scale))
    layers: list[nn.Module] = []
    for i in range(n):
        layers.append(nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2))
        if i < n - 1:
            layers += [nn.BatchNorm2d(channels), nn.GELU()]
    return nn.Sequential(*layers)


class Feature2Pyramid(nn.Module):
    """Maps same-stride ViT feature maps to a pyramid; `scales[i]` = input stride / output stride of level i."""

    def __init__(self, channels: int, scales: list[float]):
        super().__init__()
        for s in scales:
            if not (s > 0 and math.log2(s) == round(math.log2(s))):
                raise ValueError(f"Feature2Pyramid scale {s} is not a power of two")
        self.scales = list(scales)
        self.ops = nn.ModuleList(_rescale(channels, s) for s in scales)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [op(f) for op, f in zip(self.ops, feats)]


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of an NCHW map (ViTDet's norm in the simple feature pyramid)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps
                            ).permute(0, 3, 1, 2)


class ViTDetRescale(nn.Module):
    """ViTDet's rescaling of one ViT block's map (`scales[i]` = patch / output stride): x4 = ConvT (C -> C/2), LN,
    GELU, ConvT (C/2 -> C/4); x2 = ConvT (C -> C/2); x1 = identity; x0.5 = MaxPool(2) (more halvings for larger
    scales, MaxPool(4) for 0.25). Takes the same block's map once per level (backbone out_indices repeated)."""

    def __init__(self, channels: int, scales: list[float]):
        super().__init__()
        self.ops, self.out_channels = nn.ModuleList(), []
        for s in scales:
            if s <= 1:
                k = round(1 / s)
                self.ops.append(nn.Identity() if k == 1 else nn.MaxPool2d(kernel_size=k, stride=k))
                self.out_channels.append(channels)
                continue
            layers: list[nn.Module] = []
            c = channels
            for i in range(round(math.log2(s))):
                if i:
                    layers += [LayerNorm2d(c), nn.GELU()]
                layers.append(nn.ConvTranspose2d(c, max(c // 2, 1), kernel_size=2, stride=2))
                c = max(c // 2, 1)
            self.ops.append(nn.Sequential(*layers))
            self.out_channels.append(c)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [op(f) for op, f in zip(self.ops, feats)]


class TowerFPN(nn.Module):
    """Detection backbone for torchvision from a hierarchical tower: its 4 stages through torchvision's standard
    FPN (lateral 1x1 + top-down + 3x3) with a max-pooled extra level."""

    def __init__(self, body: nn.Module, channels: int = 256):
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

        self.body = body
        self.out_channels = channels
        self.fpn = FeaturePyramidNetwork(list(body.out_channels), channels, extra_blocks=LastLevelMaxPool())

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))


class SimpleFeaturePyramid(nn.Module):
    """Detection backbone for torchvision from a plain ViT (neck `vitdet`: the last block rescaled): 1x1 + 3x3 convs
    (LN, no bias) to `channels` per level, plus a max-pooled extra level (ViTDet's p6). Exposes `.out_channels` and
    returns an OrderedDict, as torchvision needs."""

    def __init__(self, body: nn.Module, channels: int = 256):
        super().__init__()
        self.body = body
        self.out_channels = channels
        self.proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, channels, 1, bias=False), LayerNorm2d(channels),
                          nn.Conv2d(channels, channels, 3, padding=1, bias=False), LayerNorm2d(channels))
            for c in body.out_channels)

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        feats = [p(f) for p, f in zip(self.proj, self.body(x))]
        out = OrderedDict((str(i), f) for i, f in enumerate(feats))
        out["pool"] = F.max_pool2d(feats[-1], kernel_size=1, stride=2)
        return out
