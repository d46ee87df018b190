"""DPT (Ranftl et al. 2021) as the Monocular-Depth-Estimation-Toolbox's `DPTHead` builds it for ViT-B on NYU:

- `Reassemble` (a plain ViT's neck, `create_backbone(..., neck="dpt")`): per tapped block, the class token is read
  out by projection (concat to every patch token, Linear(2C, C) + GELU), a 1x1 conv maps to (96, 192, 384, 768)
  channels (`DPT_CHANNELS`, scaled to the width for other ViTs), then x4 ConvT(4, 4), x2 ConvT(2, 2), x1 identity,
  x0.5 Conv3x3 stride 2 give strides 4, 8, 16, 32. Hierarchical towers (MCi, Swin, ConvNeXt) skip it: their own
  4-stage pyramid goes straight into the head.
- `DPTHead`: a 3x3 conv per level to `channels` (256), then fusion from the coarsest level: each fusion block adds
  a residual-conv-unit-refined skip, refines again, upsamples x2 (bilinear, align_corners) and projects 1x1; then
  a 3x3 conv + ReLU and the depth head (3x3 to channels/2, x2 up, 3x3 to 32, ReLU, 1x1 to `num_outputs`). Output
  stride 1 for a stride-4 first level. No normalisation layers (the Toolbox's DPT uses none), so any batch size works.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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


class ResidualConvUnit(nn.Module):
    """Pre-activation residual unit: x + conv(relu(conv(relu(x)))) (bias-free convs, as the Toolbox's)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FusionBlock(nn.Module):
    """(x [+ unit(skip resized to x)]) -> unit -> x2 up -> 1x1; the coarsest block has no skip."""

    def __init__(self, channels: int, has_skip: bool = True):
        super().__init__()
        self.skip_unit = ResidualConvUnit(channels) if has_skip else None
        self.unit = ResidualConvUnit(channels)
        self.project = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            if x.shape[-2:] != skip.shape[-2:]:  # odd sizes: the Toolbox resizes the skip to the running map
                skip = F.interpolate(skip, size=x.shape[-2:], mode="bilinear", align_corners=False)
            x = x + self.skip_unit(skip)
        x = F.interpolate(self.unit(x), scale_factor=2, mode="bilinear", align_corners=True)
        return self.project(x)


class DPTHead(nn.Module):
    """Pyramid (strides 4, 8, 16, 32) -> `num_outputs` maps at half the stride of the finest level."""

    def __init__(self, in_channels: list[int], channels: int = 256, num_outputs: int = 1):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(c, channels, 3, padding=1, bias=False) for c in in_channels)
        self.fusion = nn.ModuleList(FusionBlock(channels, has_skip=i > 0) for i in range(len(in_channels)))
        self.project = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True))
        half = max(channels // 2, 1)
        self.depth = nn.Sequential(nn.Conv2d(channels, half, 3, padding=1),
                                   nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
                                   nn.Conv2d(half, 32, 3, padding=1), nn.ReLU(inplace=True),
                                   nn.Conv2d(32, num_outputs, 1))
        # The depth model reads this map through a ReLU: a bias of 1 starts it alive everywhere (PyTorch's default
        # bias can start a whole map below zero, with no gradient to anything before it).
        nn.init.constant_(self.depth[-1].bias, 1.0)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = [conv(f) for conv, f in zip(self.convs, feats)]
        out = self.fusion[0](x[-1])
        for i in range(1, len(self.fusion)):
            out = self.fusion[i](out, x[-(i + 1)])
        return self.depth(self.project(out))
