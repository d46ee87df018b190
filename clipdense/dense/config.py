"""FinetuneConfig: one dense finetune (segmentation | depth | detection) of one backbone on one data fraction.

A discriminated union on `task`: each task has its own `data`, `head` and `eval` sections (`SegFinetune`,
`DepthFinetune`, `DetFinetune`), so a key of another task (`task: seg` with `head.depth_bins`) is a one-line
error naming the key and the tasks that have it. `FinetuneConfig.model_validate(data)` (what `load_config` calls)
and `FinetuneConfig()` pick the task's class (default seg); every task config is a `FinetuneConfig`."""
from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, Field, TypeAdapter, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from clipdense.config import Config, RayConfig
from clipdense.train.config import OptimConfig, ScheduleConfig, TrainConfig
from clipdense.train.tracking import TrackingConfig


class BackboneConfig(Config):
    name: str = "clip-tiny"  # an open_clip model name (incl. configs/models/*.json) or a timm model name
    kind: Literal["auto", "open_clip", "timm"] = "auto"  # auto: open_clip if it knows the name, else timm
    # open_clip: pretrained tag, checkpoint path, or local-dir:<dir> / hf-hub:<repo> (e.g. <out>/export/open_clip);
    # timm: weights file path (state dict, .safetensors) or hf-hub:<repo> / local-dir:<dir> (HF cache when offline)
    checkpoint: str | None = None
    model_kwargs: dict = {}  # timm: extra timm.create_model kwargs, e.g. {img_size: 512} for Swin at 512 px
    lr_scale: float = Field(1.0, gt=0, le=1)  # the trunk's lr multiplier on top of layer decay (Toolbox DPT: 0.1)
    # ViT blocks (default: [3,5,7,11] for 12 blocks; DPT: [2,5,8,11]; detection: the last block, 4 times)
    out_indices: list[int] | None = None
    drop_path: float = Field(0.0, ge=0.0, lt=1.0)
    # Probe protocol: the pretrained trunk stays fixed (no gradients, eval mode) and only the neck + head train, so
    # the score measures the encoder's features rather than what finetuning can rebuild in them.
    frozen: bool = False
    mean: list[float] | None = None  # input normalisation; default: the model's own preprocess config
    std: list[float] | None = None


def _pairs(model: BaseModel, *keys: str) -> None:
    for key in keys:
        if len(getattr(model, key)) != 2:
            raise ValueError(f"{key} must have 2 values")


class DataConfig(Config):
    """Keys every task's `data` has."""

    root: str = "data/ade"
    fraction: float = Field(1.0, gt=0.0, le=1.0)  # nested subsets: the 1/8 subset lies inside the 1/4 subset
    seed: int = 0  # picks the subset (a seeded permutation of the sorted training set)
    batch_size: int = Field(16, ge=1)  # global: split evenly over the training workers
    loader_workers: int = Field(0, ge=0)  # torch DataLoader processes per training worker
    max_eval_images: int | None = Field(None, ge=1)  # evaluate on the first N validation images (smoke runs)


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
        _pairs(self, "crop_size", "scale", "ratio_range")
        return self


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
        _pairs(self, "crop_size")
        return self


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
        _pairs(self, "lsj_scale")
        if not 0 < self.lsj_scale[0] <= self.lsj_scale[1]:
            raise ValueError(f"lsj_scale {self.lsj_scale} must be 0 < low <= high")
        return self


class SegHead(Config):
    kind: Literal["upernet", "linear"] = "upernet"  # linear: the probe's BN + 1x1 conv
    channels: int = 768  # UperNet decoder width
    pool_scales: list[int] = [1, 2, 3, 6]
    dropout: float = 0.1
    aux_channels: int = 256  # auxiliary FCN head on pyramid level 2
    aux_weight: float = 0.4  # 0 disables the auxiliary head


class DepthHead(Config):
    kind: Literal["upernet", "linear", "dpt"] = "upernet"  # dpt: DPT reassemble + fusion (dense/dpt.py)
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


class DepthEval(Config):
    tta: Literal["none", "flip"] = "none"  # whole images; flip averages with the mirrored prediction

    @field_validator("tta", mode="before")
    @classmethod
    def _tta(cls, v: Any) -> Any:
        if v == "ms_flip":
            raise ValueError("eval.tta 'ms_flip' is not supported for task depth (seg: flip | ms_flip, depth: flip)")
        return v


class DetEval(Config):
    pass  # whole images at the model's own test size; no test-time augmentation


class FinetuneConfig(Config):
    """Keys every task has; `task` picks the class holding the rest (see the module docstring)."""

    task: str = "seg"
    backbone: BackboneConfig = BackboneConfig()
    data: DataConfig = DataConfig()  # data, head, eval: each task's own class (declared here to keep the key order)
    head: Config = Config()
    eval: Config = Config()
    train: FinetuneTrain = FinetuneTrain()  # optim, schedule, scaling (workers, GPU), eval_every, seed (init + aug)
    out_dir: str = "runs/finetune"  # metrics.json, metrics.jsonl, checkpoints
    save_predictions: str | None = None  # write final predictions in the dataset's own format here
    ray: RayConfig = RayConfig()  # in_process null: Ray Train if train.scaling.num_workers > 1 or in a Tune trial
    tracking: TrackingConfig = TrackingConfig()  # progress lines, TensorBoard / MLflow / W&B (train/tracking.py)
    TASKS: ClassVar[dict[str, type["FinetuneConfig"]]] = {}

    def __new__(cls, *args, **data):
        if cls is FinetuneConfig:  # FinetuneConfig(...) -> the task's class (pydantic's __init__ then re-validates)
            return FinetuneConfig.model_validate(data)
        return super().__new__(cls)

    @classmethod
    def model_validate(cls, obj: Any, **kwargs):
        if cls is not FinetuneConfig:
            return super().model_validate(obj, **kwargs)
        if isinstance(obj, dict) and "task" not in obj:
            obj = {**obj, "task": "seg"}
        try:
            return _UNION.validate_python(obj, **kwargs)
        except ValidationError as e:
            raise _task_errors(e, obj) from None


class SegFinetune(FinetuneConfig):
    task: Literal["seg"] = "seg"
    data: SegData = SegData()
    head: SegHead = SegHead()
    eval: SegEval = SegEval()


class DepthFinetune(FinetuneConfig):
    task: Literal["depth"] = "depth"
    data: DepthData = DepthData()
    head: DepthHead = DepthHead()
    eval: DepthEval = DepthEval()


class DetFinetune(FinetuneConfig):
    task: Literal["det"] = "det"
    data: DetData = DetData()
    head: DetHead = DetHead()
    eval: DetEval = DetEval()


FinetuneConfig.TASKS.update(seg=SegFinetune, depth=DepthFinetune, det=DetFinetune)
_UNION = TypeAdapter(Annotated[Union[SegFinetune, DepthFinetune, DetFinetune], Field(discriminator="task")])


def has_key(cls: type[BaseModel], dotted: str) -> bool:
    """Whether `a.b.c` names a key of config class `cls` (anything below a free-form dict field counts)."""
    node: Any = cls
    for part in dotted.split("."):
        if not (isinstance(node, type) and issubclass(node, BaseModel)):
            return node is dict
        field = _field_of_key(node, part)
        if field is None:
            return False
        node = field.annotation
        if getattr(node, "__origin__", None) is dict:
            node = dict
    return True


def _field_of_key(cls: type[BaseModel], key: str):
    """The field that YAML key `key` sets: by its alias where it has one (`train.checkpoint.storage`)."""
    by_name = cls.model_config.get("validate_by_name", False)
    return next((f for name, f in cls.model_fields.items()
                 if key == f.alias or (key == name and (f.alias is None or by_name))), None)


def tasks_with_key(dotted: str) -> list[str]:
    """The tasks whose config has the dotted key."""
    return [name for name, c in FinetuneConfig.TASKS.items() if has_key(c, dotted)]


def _task_errors(err: ValidationError, data: Any) -> ValidationError:
    """The union's errors located as in the task's own config (no leading tag), an unknown key that another task
    has named as such: 'head.depth_bins: not a key of task seg (it is one of task depth)'."""
    task = data.get("task") if isinstance(data, dict) else None
    rows = []
    for e in err.errors():
        loc = tuple(e["loc"][1:]) if e["loc"][:1] == (task,) else tuple(e["loc"])
        row = {"type": e["type"], "loc": loc, "input": e.get("input")}
        if "ctx" in e:
            row["ctx"] = e["ctx"]
        if e["type"] == "union_tag_invalid":
            row = {"type": PydanticCustomError("task", "must be one of {tasks}",
                                               {"tasks": " | ".join(FinetuneConfig.TASKS)}),
                   "loc": ("task",), "input": task}
        key = ".".join(str(p) for p in loc)
        owners = tasks_with_key(key) if e["type"] == "extra_forbidden" else []
        if owners:
            row["type"] = PydanticCustomError(
                "task_key", "not supported for task {task} (a key of task {owners})",
                {"task": task, "owners": ", ".join(owners)})
        rows.append(row)
    return ValidationError.from_exception_data(err.title, rows)
