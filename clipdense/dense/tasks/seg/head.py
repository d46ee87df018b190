"""Segmentation's model: backbone + UperNet or linear decoder (dense/heads.py), and mmseg's auxiliary FCN head on
pyramid level 2."""
from __future__ import annotations

import torch
from torch import nn

from clipdense.dense.heads import Normalize, conv_bn_relu, decode_head, resize


class FCNHead(nn.Module):
    """mmseg FCNHead (1 conv, no input concat): the auxiliary segmentation head on one pyramid level."""

    def __init__(self, in_channels: int, channels: int, num_outputs: int, dropout: float = 0.1):
        super().__init__()
        self.conv = conv_bn_relu(in_channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_outputs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.conv(x)))


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
