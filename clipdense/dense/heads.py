"""Decoders on a 4-level pyramid that segmentation and depth share: UperNet (PPM + FPN, as mmseg's UPerHead) and the
linear probe's head, and `Normalize`, with which each task's model (tasks/<task>/head.py) takes uint8 or [0,1]
images and normalises inside."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


def resize(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class UperHead(nn.Module):
    """UperNet: pyramid pooling on the last level, FPN top-down fusion, concat at stride 4 -> `num_outputs` maps."""

    def __init__(self, in_channels: list[int], channels: int, num_outputs: int,
                 pool_scales=(1, 2, 3, 6), dropout: float = 0.1):
        super().__init__()
        self.ppm = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(in_channels[-1], channels, 1))
                                 for s in pool_scales)
        self.ppm_bottleneck = conv_bn_relu(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.lateral = nn.ModuleList(conv_bn_relu(c, channels, 1) for c in in_channels[:-1])
        self.fpn = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in in_channels[:-1])
        self.fuse = conv_bn_relu(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_outputs, 1)

    def _psp(self, x: torch.Tensor) -> torch.Tensor:
        outs = [x] + [resize(p(x), x.shape[-2:]) for p in self.ppm]
        return self.ppm_bottleneck(torch.cat(outs, dim=1))

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        lat = [conv(f) for conv, f in zip(self.lateral, feats[:-1])] + [self._psp(feats[-1])]
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + resize(lat[i], lat[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn, lat[:-1])] + [lat[-1]]
        outs = [outs[0]] + [resize(o, outs[0].shape[-2:]) for o in outs[1:]]
        return self.classifier(self.dropout(self.fuse(torch.cat(outs, dim=1))))


class LinearHead(nn.Module):
    """The linear probe's decoder (DINOv2's `linear` protocol): every pyramid level resized to the finest,
    concatenated, BatchNorm, one 1x1 conv. With a frozen trunk the score says what the features hold, not what a
    deep decoder can compute from them."""

    def __init__(self, in_channels: list[int], num_outputs: int, dropout: float = 0.0):
        super().__init__()
        self.bn = nn.BatchNorm2d(sum(in_channels))
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(sum(in_channels), num_outputs, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        size = feats[0].shape[-2:]
        x = torch.cat([feats[0]] + [resize(f, size) for f in feats[1:]], dim=1)
        return self.classifier(self.dropout(self.bn(x)))


def decode_head(kind: str, in_channels: list[int], channels: int, num_outputs: int, pool_scales, dropout: float):
    """UperNet, or the linear probe's head for `kind` "linear"."""
    if kind == "linear":
        return LinearHead(in_channels, num_outputs, dropout)
    return UperHead(in_channels, channels, num_outputs, pool_scales, dropout)


class Normalize(nn.Module):
    """uint8 (0..255) or float (0..1) images -> (x - mean) / std; lives in the model so data stays uint8."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        return (x - self.mean) / self.std
