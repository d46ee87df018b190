"""Detection models from torchvision pieces: Faster R-CNN, or ViTDet's Mask R-CNN (Li et al. 2022, detectron2
projects/ViTDet), on the backbone's pyramid.

- Pyramid: a plain ViT's last block through ViTDet's simple feature pyramid (`necks.ViTDetRescale` inside the
  backbone, then `SimpleFeaturePyramid`: 1x1 + 3x3 LayerNorm convs per level + a max-pooled p6); a hierarchical
  tower (MCi, Swin, ConvNeXt) feeds its own 4 stages through torchvision's FPN (`TowerFPN`).
- `mask_rcnn`: ViTDet's heads: a 2-conv RPN head (1000 proposals after NMS in training, as detectron2), a 4-conv
  (LayerNorm) + 1-fc box head, a 4-conv (LayerNorm) mask head. `faster_rcnn`: torchvision's 1-conv RPN head and
  two-MLP box head.
- Input: [0, 1] float images, normalised by the backbone's mean/std. Without LSJ torchvision resizes to
  min_size/max_size; with `lsj_size` (ViTDet's 1024) `SquareTransform` keeps the dataset's jittered training
  images as they are, resizes test images so the long side is lsj_size, and pads both to the lsj_size square."""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from clipdense.config import ConfigError
from clipdense.dense.backbones import backbone_family
from clipdense.dense.necks import LayerNorm2d
from clipdense.dense.tasks.det.config import DetHead


class SquareTransform(GeneralizedRCNNTransform):
    """ViTDet's input handling for large-scale jitter (see the module docstring)."""

    def __init__(self, size: int, image_mean, image_std):
        super().__init__(size, size, image_mean, image_std, size_divisible=size)

    def resize(self, image, target=None):
        if self.training:  # already jittered and cropped by the dataset
            return image, target
        return super().resize(image, target)


def detection_pyramid(backbone: nn.Module, channels: int) -> nn.Module:
    """ViTDet's simple feature pyramid for a plain ViT (built with neck `vitdet`), torchvision's FPN otherwise."""
    if backbone_family(backbone) == "hierarchical":
        return TowerFPN(backbone, channels)
    return SimpleFeaturePyramid(backbone, channels)


def build_detector(backbone: nn.Module, num_classes: int, head: DetHead, lsj_size: int | None = None) -> nn.Module:
    """Faster or Mask R-CNN with `num_classes` object categories (+ background)."""
    from torchvision.models.detection import FasterRCNN, MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.models.detection.rpn import RPNHead
    from torchvision.ops import MultiScaleRoIAlign

    c = head.fpn_channels
    pyramid = detection_pyramid(backbone, c)
    levels = len(backbone.out_channels) + 1  # + the max-pooled level
    if len(head.anchor_sizes) != levels:
        raise ConfigError(f"head.anchor_sizes needs {levels} sizes (one per pyramid level), got {head.anchor_sizes}")
    anchors = AnchorGenerator(sizes=tuple((s,) for s in head.anchor_sizes), aspect_ratios=((0.5, 1.0, 2.0),) * levels)
    names = [str(i) for i in range(levels - 1)]
    common = dict(rpn_anchor_generator=anchors, min_size=head.min_size, max_size=head.max_size,
                  image_mean=list(backbone.mean), image_std=list(backbone.std),
                  box_detections_per_img=head.box_detections_per_img, box_score_thresh=head.box_score_thresh,
                  box_batch_size_per_image=head.box_batch_size_per_image,
                  box_roi_pool=MultiScaleRoIAlign(featmap_names=names, output_size=7, sampling_ratio=2),
                  box_predictor=FastRCNNPredictor(head.representation_size, num_classes + 1))
    if head.kind == "mask_rcnn":
        model = MaskRCNN(
            pyramid, rpn_head=RPNHead(c, 3, conv_depth=2), rpn_post_nms_top_n_train=1000,
            box_head=FastRCNNConvFCHead((c, 7, 7), [c] * 4, [head.representation_size], norm_layer=LayerNorm2d),
            mask_roi_pool=MultiScaleRoIAlign(featmap_names=names, output_size=14, sampling_ratio=2),
            mask_head=MaskRCNNHeads(c, [c] * 4, 1, norm_layer=LayerNorm2d),
            mask_predictor=MaskRCNNPredictor(c, c, num_classes + 1), **common)
    else:
        model = FasterRCNN(pyramid, box_head=TwoMLPHead(c * 7 * 7, head.representation_size), **common)
    if lsj_size:
        model.transform = SquareTransform(lsj_size, list(backbone.mean), list(backbone.std))
    return model


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
