"""Necks: Feature2Pyramid (plain ViT tokens -> strides 4/8/16/32) and the ViTDet simple feature pyramid for detection."""
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


class SimpleFeaturePyramid(nn.Module):
    """Detection backbone for torchvision: pyramid backbone -> 1x1 + 3x3 convs (LN) to `channels` per level, plus
    a max-pooled extra level (ViTDet's p6). Exposes `.out_channels` and returns an OrderedDict, as torchvision needs."""

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
