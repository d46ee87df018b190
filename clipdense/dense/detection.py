"""Detection: torchvision Faster R-CNN on the backbone's pyramid through a ViTDet-style simple feature pyramid."""
from __future__ import annotations

from torch import nn

from clipdense.dense.config import HeadConfig
from clipdense.dense.necks import SimpleFeaturePyramid


def build_detector(backbone: nn.Module, num_classes: int, head: HeadConfig) -> nn.Module:
    """Faster R-CNN with `num_classes` object categories (+ background). Images go in as [0,1] float tensors;
    torchvision resizes (min_size/max_size) and normalises with the backbone's mean/std."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    fpn = SimpleFeaturePyramid(backbone, head.fpn_channels)
    levels = len(backbone.out_channels) + 1  # + the max-pooled level
    if len(head.anchor_sizes) != levels:
        from clipdense.errors import ConfigError
        raise ConfigError(f"head.anchor_sizes needs {levels} sizes (one per pyramid level), got {head.anchor_sizes}")
    anchors = AnchorGenerator(sizes=tuple((s,) for s in head.anchor_sizes), aspect_ratios=((0.5, 1.0, 2.0),) * levels)
    roi_pool = MultiScaleRoIAlign(featmap_names=[str(i) for i in range(levels - 1)], output_size=7, sampling_ratio=2)
    box_head = TwoMLPHead(head.fpn_channels * 7 * 7, head.representation_size)
    return FasterRCNN(fpn, rpn_anchor_generator=anchors, box_roi_pool=roi_pool, box_head=box_head,
                      box_predictor=FastRCNNPredictor(head.representation_size, num_classes + 1),
                      min_size=head.min_size, max_size=head.max_size, image_mean=list(backbone.mean),
                      image_std=list(backbone.std), box_detections_per_img=head.box_detections_per_img,
                      box_batch_size_per_image=head.box_batch_size_per_image)
