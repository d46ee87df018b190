"""FinetuneConfig: one dense finetune (segmentation | depth | detection) of one backbone on one data fraction."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from clipdense.train.tracking import TrackingConfig
from clipdense.config import Config
from clipdense.ray_session import RayConfig, StageConfig
from clipdense.train.config import OptimConfig, ScheduleConfig, TrainConfig


class BackboneConfig(Config):
    name: str = "clip-tiny"  # an open_clip model name (incl. configs/models/*.json) or a timm model name
    kind: Literal["auto", "open_clip", "timm"] = "auto"  # auto: open_clip if it knows the name, else timm
    # open_clip: pretrained tag, checkpoint path, or local-dir:<dir> / hf-hub:<repo> (e.g. <out>/export/open_clip);
    # timm: weights file path (state dict, .safetensors) or hf-hub:<repo> / local-dir:<dir> (HF cache when offline)
    checkpoint: str | None = None
    model_kwargs: dict = {}  # timm: extra timm.create_model kwargs, e.g. {img_size: 512} for Swin at 512 px
    lr_scale: float = Field(1.0, gt=0, le=1)  # the trunk's lr multiplier on top of layer decay (Toolbox DPT: 0.1)
    out_indices: list[int] | None = None  # ViT blocks (default: [3,5,7,11] for 12 blocks; DPT: [2,5,8,11])
    drop_path: float = Field(0.0, ge=0.0, lt=1.0)
    # Probe protocol: the pretrained trunk stays fixed (no gradients, eval mode) and only the neck + head train, so
    # the score measures the encoder's features rather than what finetuning can rebuild in them.
    frozen: bool = False
    mean: list[float] | None = None  # input normalisation; default: the model's own preprocess config
    std: list[float] | None = None


class DataConfig(Config):
    root: str = "data/ade"  # ADE: dir holding ADEChallengeData2016/ (or that dir); NYU: BTS root; COCO: root
    fraction: float = Field(1.0, gt=0.0, le=1.0)  # nested subsets: the 1/8 subset lies inside the 1/4 subset
    seed: int = 0  # picks the subset (a seeded permutation of the sorted training set)
    batch_size: int = Field(16, ge=1)  # global: split evenly over the training workers
    loader_workers: int = Field(0, ge=0)  # torch DataLoader processes per training worker
    num_classes: int = Field(150, ge=1)  # seg: classes after reduce_zero_label; det: object categories
    reduce_zero_label: bool = True  # seg: label 0 -> 255 (ignored), k -> k-1
    crop_size: list[int] = [512, 512]  # (h, w) training crop
    scale: list[int] = [2048, 512]  # seg: (long, short) resize target before the random ratio (mmseg img_scale)
    ratio_range: list[float] = [0.5, 2.0]
    cat_max_ratio: float = 0.75  # seg: re-draw a crop (up to 10 times) while one class covers more than this
    photometric: bool = True
    # depth, the Monocular-Depth-Estimation-Toolbox's NYU pipeline: NYUCrop (480x640 -> rows 45:472, cols 43:608, the
    # white border gone), a random rotation of +-rotate_degrees (p 0.5) and ColorAug (p 0.5: gamma 0.9-1.1,
    # brightness 0.75-1.25, per-channel colour 0.9-1.1) in place of `photometric`
    nyu_crop: bool = False
    rotate_degrees: float = Field(0.0, ge=0.0, le=180.0)
    color_aug: bool = False
    max_depth: float = 10.0  # depth: decoder range and evaluation cap (BTS NYU: 10 m)
    min_depth: float = 1e-3
    train_list: str = "nyudepthv2_train_files_with_gt.txt"  # depth: list files, relative to root
    test_list: str = "nyudepthv2_test_files_with_gt.txt"
    train_dir: str = ""  # depth: list paths are relative to root/train_dir (BTS real NYU: "sync")
    test_dir: str = ""  # (BTS real NYU: "official_splits/test")
    train_split: str = ""  # defaults: ADE "training"/"validation"; COCO "train2017"/"val2017"
    val_split: str = ""
    max_eval_images: int | None = Field(None, ge=1)  # evaluate on the first N validation images (smoke runs)

    @model_validator(mode="after")
    def _pairs(self):
        for key in ("crop_size", "scale", "ratio_range"):
            if len(getattr(self, key)) != 2:
                raise ValueError(f"{key} must have 2 values")
        return self


class HeadConfig(Config):
    # seg/depth decoder; linear: the probe's BN + 1x1 conv; dpt: DPT reassemble + fusion (depth; dense/dpt.py)
    kind: Literal["upernet", "linear", "dpt"] = "upernet"
    channels: int = 768  # UperNet (seg/depth) decoder width
    pool_scales: list[int] = [1, 2, 3, 6]
    dropout: float = 0.1
    aux_channels: int = 256  # seg: auxiliary FCN head on pyramid level 2
    aux_weight: float = 0.4  # 0 disables the auxiliary head
    depth_loss_weight: float = 10.0  # SigLoss weight (Monocular-Depth-Estimation-Toolbox)
    depth_bins: int = Field(0, ge=0, description="depth: 0 regresses sigmoid * max_depth; N >= 2 classifies into N "
                                                 "uniform bins (DINOv2's linear depth probe uses 256)")
    fpn_channels: int = 256  # det: simple feature pyramid width
    anchor_sizes: list[int] = [32, 64, 128, 256, 512]  # det: one per level (4 pyramid levels + max-pool level)
    min_size: int = 800  # det: torchvision resize (shorter side) and cap (longer side)
    max_size: int = 1333
    representation_size: int = 1024  # det: box head MLP width (torchvision TwoMLPHead)
    box_batch_size_per_image: int = 512  # det: sampled RoIs per image for the box head loss
    box_detections_per_img: int = 100


class FinetuneOptim(OptimConfig):
    """The runner's AdamW with the mmseg MAE/BEiT UperNet recipe as defaults."""

    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float | None = None
    # lr scale = layer_decay ** (head id - layer id), ids per backbone family (clipdense.dense.optim); null = off;
    # auto = the family's default: ViT 0.65 (mmseg MAE), hierarchical timm towers 0.9 (mmseg ConvNeXt)
    layer_decay: Annotated[float, Field(gt=0, le=1)] | Literal["auto"] | None = "auto"


class FinetuneSchedule(ScheduleConfig):
    kind: Literal["cosine", "poly", "constant"] = "poly"  # linear warmup, then poly (power 1) to 0
    warmup_steps: int = Field(1500, ge=0)
    total_steps: int = Field(160_000, ge=1)


class FinetuneTrain(TrainConfig):
    """The one training runner's config (clipdense.train) with finetune defaults; `out_dir` comes from the top level."""

    optim: FinetuneOptim = FinetuneOptim()
    schedule: FinetuneSchedule = FinetuneSchedule()


class EvalConfig(Config):
    mode: Literal["slide", "whole"] = "slide"  # seg: sliding window; depth/det always run whole images
    crop_size: list[int] = [512, 512]
    stride: list[int] = [341, 341]
    test_scale: list[int] | None = [2048, 512]  # seg: (long, short) keep-ratio resize before inference; None = as is
    # test-time augmentation: flip averages with the mirrored prediction (seg, depth); ms_flip (seg, mmseg "ms+flip")
    # averages class probabilities over tta_scales x {as is, mirrored}, each ratio applied to the test-scale image
    tta: Literal["none", "flip", "ms_flip"] = "none"
    tta_scales: list[Annotated[float, Field(gt=0)]] = Field([0.5, 0.75, 1.0, 1.25, 1.5, 1.75], min_length=1)
    batch_size: int = Field(1, ge=1)


class FinetuneConfig(StageConfig):
    task: Literal["seg", "depth", "det"] = "seg"
    backbone: BackboneConfig = BackboneConfig()
    data: DataConfig = DataConfig()
    head: HeadConfig = HeadConfig()
    eval: EvalConfig = EvalConfig()
    train: FinetuneTrain = FinetuneTrain()  # optim, schedule, scaling (workers, GPU), eval_every, seed (init + aug)
    out_dir: str = "runs/finetune"  # metrics.json, metrics.jsonl, checkpoints
    save_predictions: str | None = None  # write final predictions in the dataset's own format here
    ray: RayConfig = RayConfig()  # in_process null: Ray Train if train.scaling.num_workers > 1 or in a Tune trial
    tracking: TrackingConfig = TrackingConfig()  # progress lines, TensorBoard / MLflow / W&B (train/tracking.py)

    @model_validator(mode="after")
    def _head_fits_task(self):
        if self.task == "det" and self.head.kind != "upernet":
            raise ValueError(f"head.kind {self.head.kind!r} is a seg/depth decoder; task det uses Faster R-CNN heads")
        if self.eval.tta != "none" and (self.task == "det" or (self.task == "depth" and self.eval.tta == "ms_flip")):
            raise ValueError(f"eval.tta {self.eval.tta!r} is not supported for task {self.task} "
                             "(seg: flip | ms_flip, depth: flip, det: none)")
        if self.head.kind == "dpt" and self.task != "depth":
            raise ValueError(f"head.kind 'dpt' is a depth decoder; task {self.task} has none")
        if self.head.depth_bins == 1:
            raise ValueError("head.depth_bins must be 0 (regression) or at least 2 (one bin predicts a constant)")
        return self
