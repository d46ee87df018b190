"""The config keys every dense task shares: the backbone, the data keys every task's `data` has, the training
runner's section with finetune defaults, and `FinetuneBase`, the top level each task's config extends
(dense/tasks/<task>/config.py). `FinetuneConfig` (dense/config.py) picks the task's config by `task`."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from clipdense.config import Config, RayConfig
from clipdense.train.config import OptimConfig, ScheduleConfig, TrainConfig
from clipdense.train.tracking import TrackingConfig


class BackboneConfig(Config):
    name: str = "clip-tiny"  # an open_clip model name (incl. configs/models/*.json) or a timm model name
    kind: Literal["auto", "open_clip", "timm"] = "auto"  # auto: open_clip if it knows the name, else timm
    # open_clip: pretrained tag, checkpoint path, or local-dir:<dir> / hf-hub:<repo> (e.g. <out>/export/open_clip);
    # timm: weights file path (state dict, .safetensors) or hf-hub:<repo> / local-dir:<dir> (HF cache when offline)
    checkpoint: str | None = None
    # random init (no checkpoint) drawn from this seed, independent of the finetune seed: the floor's own "runs"
    init_seed: int | None = None
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


def check_pairs(model: BaseModel, *keys: str) -> None:
    """Each key holds exactly 2 values ((h, w) sizes, (low, high) ranges)."""
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


class FinetuneBase(Config):
    """Keys every task has; each task's config (`SegFinetune`, `DepthFinetune`, `DetFinetune`) fixes `task` and
    declares its own `data`, `head` and `eval` sections."""

    task: str = "seg"
    backbone: BackboneConfig = BackboneConfig()
    data: DataConfig = DataConfig()  # data, head, eval: each task's own class (declared here to keep the key order)
    head: Config = Config()
    eval: Config = Config()
    train: FinetuneTrain = FinetuneTrain()  # optim, schedule, scaling (workers, GPU), eval_every, seed (init + aug)
    out_dir: str = "runs/finetune"  # metrics.json, metrics.jsonl, checkpoints
    save_predictions: str | None = None  # write final predictions in the dataset's own format here
    ray: RayConfig = RayConfig()  # in_process null: Ray Train if train.scaling.num_workers > 1 or in a Tune trial
    tracking: TrackingConfig = TrackingConfig()  # progress lines, TensorBoard / MLflow / W&B (train/tracking/)
