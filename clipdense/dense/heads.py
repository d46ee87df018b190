"""Decoders on a 4-level pyramid: UperNet (PPM + FPN, as mmseg's UPerHead), the auxiliary FCN head, and the
segmentation / depth models that pair them with a backbone. Models take uint8 or [0,1] images and normalise inside."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clipdense.dense.dpt import DPTHead


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
    if kind == "linear":
        return LinearHead(in_channels, num_outputs, dropout)
    if kind == "dpt":
        return DPTHead(in_channels, channels, num_outputs)
    return UperHead(in_channels, channels, num_outputs, pool_scales, dropout)


class FCNHead(nn.Module):
    """mmseg FCNHead (1 conv, no input concat): the auxiliary segmentation head on one pyramid level."""

    def __init__(self, in_channels: int, channels: int, num_outputs: int, dropout: float = 0.1):
        super().__init__()
        self.conv = conv_bn_relu(in_channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_outputs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.conv(x)))


class Normalize(nn.Module):
    """uint8 (0..255) or float (0..1) images -> (x - mean) / std; lives in the model so data stays uint8."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        return (x - self.mean) / self.std


class SegModel(nn.Module):
    """Backbone + UperNet or linear decoder (+ auxiliary FCN on level 2).
    forward -> {"seg": logits at stride 4, "aux": ...}."""

    def __init__(self, backbone: nn.Module, num_classes: int, channels: int = 768, pool_scales=(1, 2, 3, 6),
                 dropout: float = 0.1, aux_channels: int = 256, aux: bool = True, kind: str = "upernet"):
        super().__init__()
        self.backbone = backbone
        self.normalize = Normalize(backbone.mean, backbone.std)
        ch = backbone.out_channels
        self.decode_head = decode_head(kind, ch, channels, num_classes, pool_scales, dropout)
        self.aux_head = FCNHead(ch[2], aux_channels, num_classes, dropout) if aux else None

    def forward(self, img: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone(self.normalize(img))
        out = {"seg": self.decode_head(feats)}
        if self.aux_head is not None and self.training:
            out["aux"] = self.aux_head(feats[2])
        return out

    @torch.no_grad()
    def predict(self, img: torch.Tensor) -> torch.Tensor:
        """Class logits at the input's size."""
        return resize(self(img)["seg"], img.shape[-2:])


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
        self.decode_head = decode_head(kind, backbone.out_channels, channels, max(bins, 1), pool_scales, dropout)
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
