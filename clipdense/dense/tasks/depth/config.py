"""Depth's config (NYUv2 / BTS layout, the Monocular-Depth-Estimation-Toolbox's recipes): its `data`, `head` and
`eval` sections."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from clipdense.config import Config
from clipdense.dense.base_config import DataConfig, FinetuneBase, check_pairs


class DepthData(DataConfig):
    root: str = "data/nyu"  # the BTS root
    crop_size: list[int] = [512, 512]  # (h, w) training crop
    photometric: bool = True
    # the Monocular-Depth-Estimation-Toolbox's NYU pipeline: NYUCrop (480x640 -> rows 45:472, cols 43:608, the
    # white border gone), a random rotation of +-rotate_degrees (p 0.5) and ColorAug (p 0.5: gamma 0.9-1.1,
    # brightness 0.75-1.25, per-channel colour 0.9-1.1) in place of `photometric`
    nyu_crop: bool = False
    rotate_degrees: float = Field(0.0, ge=0.0, le=180.0)
    color_aug: bool = False
    max_depth: float = 10.0  # decoder range and evaluation cap (BTS NYU: 10 m)
    min_depth: float = 1e-3
    train_list: str = "nyudepthv2_train_files_with_gt.txt"  # list files, relative to root
    test_list: str = "nyudepthv2_test_files_with_gt.txt"
    train_dir: str = ""  # list paths are relative to root/train_dir (BTS real NYU: "sync")
    test_dir: str = ""  # (BTS real NYU: "official_splits/test")

    @model_validator(mode="after")
    def _check(self):
        check_pairs(self, "crop_size")
        return self


class DepthHead(Config):
    kind: Literal["upernet", "linear", "dpt"] = "upernet"  # dpt: DPT reassemble + fusion (tasks/depth/head.py)
    channels: int = 768  # decoder width
    pool_scales: list[int] = [1, 2, 3, 6]
    dropout: float = 0.1
    depth_loss_weight: float = 10.0  # SigLoss weight (Monocular-Depth-Estimation-Toolbox)
    depth_bins: int = Field(0, ge=0, description="0 regresses sigmoid * max_depth; N >= 2 classifies into N "
                                                 "uniform bins (DINOv2's linear depth probe uses 256)")

    @field_validator("depth_bins")
    @classmethod
    def _bins(cls, v: int) -> int:
        if v == 1:
            raise ValueError("head.depth_bins must be 0 (regression) or at least 2 (one bin predicts a constant)")
        return v


class DepthEval(Config):
    tta: Literal["none", "flip"] = "none"  # whole images; flip averages with the mirrored prediction

    @field_validator("tta", mode="before")
    @classmethod
    def _tta(cls, v: Any) -> Any:
        if v == "ms_flip":
            raise ValueError("eval.tta 'ms_flip' is not supported for task depth (seg: flip | ms_flip, depth: flip)")
        return v


class DepthFinetune(FinetuneBase):
    task: Literal["depth"] = "depth"
    data: DepthData = DepthData()
    head: DepthHead = DepthHead()
    eval: DepthEval = DepthEval()
