"""Depth's model (`DepthModel`: backbone + decoder -> metric depth, by regression or DINOv2's bins) and its DPT
decoder (Ranftl et al. 2021) as the Monocular-Depth-Estimation-Toolbox's `DPTHead` builds it for ViT-B on NYU:

- `necks.Reassemble` (a plain ViT's neck, `create_backbone(..., neck="dpt")`): per tapped block, the class token is read
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

from clipdense.dense.heads import Normalize, decode_head, resize


def depth_decoder(kind: str, in_channels: list[int], channels: int, num_outputs: int, pool_scales, dropout: float):
    """DPT's fusion head for `kind` "dpt", else UperNet or the linear probe's head."""
    if kind == "dpt":
        return DPTHead(in_channels, channels, num_outputs)
    return decode_head(kind, in_channels, channels, num_outputs, pool_scales, dropout)


class DepthModel(nn.Module):
    """Backbone + decoder -> metric depth at the input size. `bins` = 0: one output, sigmoid * max_depth (BTS /
    Monocular-Depth-Estimation-Toolbox `scale_up`), or for `kind="dpt"` relu + min_depth (the Toolbox's DPT).
    `bins` = N: DINOv2's linear depth protocol (after AdaBins): N uniform depth
    bins over [min_depth, max_depth], scores relu + 0.1 normalised to weights, depth = the weighted mean bin centre."""

    def __init__(self, backbone: nn.Module, max_depth: float = 10.0, channels: int = 768, pool_scales=(1, 2, 3, 6),
                 dropout: float = 0.1, kind: str = "upernet", bins: int = 0, min_depth: float = 1e-3):
        super().__init__()
        self.backbone = backbone
        self.normalize = Normalize(backbone.mean, backbone.std)
        self.max_depth, self.min_depth, self.kind = max_depth, min_depth, kind
        self.decode_head = depth_decoder(kind, backbone.out_channels, channels, max(bins, 1), pool_scales, dropout)
        self.register_buffer("bin_centres", torch.linspace(min_depth, max_depth, bins) if bins else None,
                             persistent=False)

    def forward(self, img: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.decode_head(self.backbone(self.normalize(img)))
        if self.bin_centres is None:
            out = resize(out, img.shape[-2:])[:, 0]
            if self.kind == "dpt":
                return {"depth": torch.relu(out) + self.min_depth}
            return {"depth": torch.sigmoid(out) * self.max_depth}
        weights = torch.relu(out) + 0.1
        depth = torch.einsum("bkhw,k->bhw", weights / weights.sum(dim=1, keepdim=True), self.bin_centres)
        return {"depth": resize(depth[:, None], img.shape[-2:])[:, 0]}

    @torch.no_grad()
    def predict(self, img: torch.Tensor) -> torch.Tensor:
        return self(img)["depth"]


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
