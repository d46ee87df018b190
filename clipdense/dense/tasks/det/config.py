"""Detection's config (COCO layout; torchvision Faster R-CNN, ViTDet's Mask R-CNN): its `data`, `head` and `eval`
sections."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from clipdense.config import Config
from clipdense.dense.base_config import DataConfig, FinetuneBase, check_pairs


class DetData(DataConfig):
    root: str = "data/coco"  # holds annotations/instances_<split>.json and <split>/
    train_split: str = "train2017"
    val_split: str = "val2017"
    # ViTDet's large-scale jitter: resize to fit lsj_size x U(lsj_scale), random crop to lsj_size, flip; the model
    # then takes images as they come (no second resize), padded to the lsj_size square, and evaluates with the long
    # side resized to lsj_size. null: torchvision's min_size / max_size resize (head.min_size, head.max_size) + flip
    lsj_size: int | None = Field(None, ge=32)
    lsj_scale: list[float] = [0.1, 2.0]

    @model_validator(mode="after")
    def _check(self):
        check_pairs(self, "lsj_scale")
        if not 0 < self.lsj_scale[0] <= self.lsj_scale[1]:
            raise ValueError(f"lsj_scale {self.lsj_scale} must be 0 < low <= high")
        return self


class DetHead(Config):
    # faster_rcnn: boxes, torchvision's two-MLP box head; mask_rcnn: ViTDet's Mask R-CNN (boxes + masks, a 4-conv
    # LayerNorm box head + 1 fc, LayerNorm mask head, 2-conv RPN head). Pyramid: a plain ViT's last block through
    # ViTDet's simple feature pyramid; a hierarchical tower's 4 stages through torchvision's FPN
    kind: Literal["faster_rcnn", "mask_rcnn"] = "faster_rcnn"
    fpn_channels: int = 256  # pyramid width
    anchor_sizes: list[int] = [32, 64, 128, 256, 512]  # one per level (4 pyramid levels + max-pool level)
    min_size: int = 800  # torchvision resize (shorter side) and cap (longer side), when data.lsj_size is null
    max_size: int = 1333
    representation_size: int = 1024  # box head fc width
    box_batch_size_per_image: int = 512  # sampled RoIs per image for the box head loss
    box_detections_per_img: int = 100
    box_score_thresh: float = Field(0.05, ge=0, le=1)  # detections kept at test time (torchvision, ViTDet: 0.05)

    @field_validator("kind", mode="before")
    @classmethod
    def _kind(cls, v: Any) -> Any:
        if v in ("upernet", "linear", "dpt"):
            raise ValueError(f"head.kind {v!r} is a seg/depth decoder; task det uses 'faster_rcnn' | 'mask_rcnn'")
        return v


class DetEval(Config):
    pass  # whole images at the model's own test size; no test-time augmentation


class DetFinetune(FinetuneBase):
    task: Literal["det"] = "det"
    data: DetData = DetData()
    head: DetHead = DetHead()
    eval: DetEval = DetEval()
