"""Necks: how a plain ViT's same-stride maps become a pyramid at strides 4/8/16/32 (backbones.py picks one by the
task's `neck`): mmseg's Feature2Pyramid, ViTDet's rescaling of one block (`ViTDetRescale`; detection's pyramid
convs are in tasks/det/head.py), and DPT's reassemble (`Reassemble`: class-token readout by projection, 1x1 to
(96, 192, 384, 768) channels for ViT-B (`DPT_CHANNELS`, scaled to the width for other ViTs), then x4 ConvT(4, 4),
x2 ConvT(2, 2), x1 identity, x0.5 Conv3x3 stride 2; DPT's fusion head is in tasks/depth/head.py)."""
from __future__ import annotations

import math

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


DPT_CHANNELS = (96, 192, 384, 768)  # the Toolbox's post_process_channels for ViT-B (width 768)


def _resample(channels: int, scale: float) -> nn.Module:
    if scale == 1:
        return nn.Identity()
    if scale > 1:
        k = int(scale)
        return nn.ConvTranspose2d(channels, channels, kernel_size=k, stride=k)
    k = round(1 / scale)
    return nn.Conv2d(channels, channels, kernel_size=3, stride=k, padding=1)


class Reassemble(nn.Module):
    """Same-stride ViT token maps (+ class tokens) -> a 4-level pyramid; `scales[i]` = patch / output stride."""

    uses_cls = True

    def __init__(self, width: int, scales: list[float], channels: tuple[int, ...] | None = None):
        super().__init__()
        channels = channels or tuple(max(8, c * width // 768) for c in DPT_CHANNELS)
        self.out_channels = list(channels)
        self.readout = nn.ModuleList(nn.Sequential(nn.Linear(2 * width, width), nn.GELU()) for _ in scales)
        self.project = nn.ModuleList(nn.Conv2d(width, c, 1) for c in channels)
        self.resample = nn.ModuleList(_resample(c, s) for c, s in zip(channels, scales))

    def forward(self, maps: list[torch.Tensor], cls: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for x, c, readout, project, resample in zip(maps, cls, self.readout, self.project, self.resample):
            b, w, h, wd = x.shape
            tokens = x.flatten(2).transpose(1, 2)
            tokens = readout(torch.cat([tokens, c[:, None].expand_as(tokens)], dim=-1))
            out.append(resample(project(tokens.transpose(1, 2).reshape(b, w, h, wd))))
        return out
