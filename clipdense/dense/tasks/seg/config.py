"""Segmentation's config (ADE20k layout, mmseg's UperNet recipe): its `data`, `head` and `eval` sections."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from clipdense.config import Config
from clipdense.dense.base_config import DataConfig, FinetuneBase, check_pairs


class SegData(DataConfig):
    root: str = "data/ade"  # holds ADEChallengeData2016/ (or is that dir)
    num_classes: int = Field(150, ge=1)  # classes after reduce_zero_label
    reduce_zero_label: bool = True  # label 0 -> 255 (ignored), k -> k-1
    crop_size: list[int] = [512, 512]  # (h, w) training crop
    scale: list[int] = [2048, 512]  # (long, short) resize target before the random ratio (mmseg img_scale)
    ratio_range: list[float] = [0.5, 2.0]
    cat_max_ratio: float = 0.75  # re-draw a crop (up to 10 times) while one class covers more than this
    photometric: bool = True
    train_split: str = "training"
    val_split: str = "validation"

    @model_validator(mode="after")
    def _check(self):
        check_pairs(self, "crop_size", "scale", "ratio_range")
        return self


class SegHead(Config):
    kind: Literal["upernet", "linear"] = "upernet"  # linear: the probe's BN + 1x1 conv
    channels: int = 768  # UperNet decoder width
    pool_scales: list[int] = [1, 2, 3, 6]
    dropout: float = 0.1
    aux_channels: int = 256  # auxiliary FCN head on pyramid level 2
    aux_weight: float = 0.4  # 0 disables the auxiliary head


class SegEval(Config):
    mode: Literal["slide", "whole"] = "slide"  # sliding window or the whole (padded) image
    crop_size: list[int] = [512, 512]
    stride: list[int] = [341, 341]
    test_scale: list[int] | None = [2048, 512]  # (long, short) keep-ratio resize before inference; None = as is
    # test-time augmentation: flip averages with the mirrored prediction; ms_flip (mmseg "ms+flip") averages class
    # probabilities over tta_scales x {as is, mirrored}, each ratio applied to the test-scale image
    tta: Literal["none", "flip", "ms_flip"] = "none"
    tta_scales: list[Annotated[float, Field(gt=0)]] = Field([0.5, 0.75, 1.0, 1.25, 1.5, 1.75], min_length=1)
    batch_size: int = Field(1, ge=1)  # sliding windows per forward


class SegFinetune(FinetuneBase):
    task: Literal["seg"] = "seg"
    data: SegData = SegData()
    head: SegHead = SegHead()
    eval: SegEval = SegEval()
