"""Pretrain stage config: `clipdense pretrain --config configs/pretrain/<name>.yaml [a.b=v ...]`."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from clipdense.config import Config, RayConfig
from clipdense.data.storage import StorageKeys
from clipdense.eval.config import ZeroShotConfig
from clipdense.train.config import OptimConfig, ScheduleConfig, TrainConfig
from clipdense.train.tracking import TrackingConfig


class ModelConfig(Config):
    name: str = "clip-tiny"                 # open_clip name (ViT-B-16, MobileCLIP-S2, coca_ViT-B-32, clip-tiny, ...)
    pretrained: str | None = None           # open_clip tag or local checkpoint (state_dict .pt) to start from


class DataConfig(StorageKeys):
    """Images come from `shards` (tar/Parquet, as `data.shards.read_shards` reads them); captions from the
    recaption stage's Parquet files in `recaptions` (one `<shard stem>.parquet` per input shard, joined by key, or
    DataCompDR's `<shard stem>.tar` shards, joined by uid), or
    from the shards themselves when `recaptions` is null (e.g. one Parquet holding images + captions)."""

    shards: str | list[str] = "PLACEHOLDER/web/{00000..00003}.tar"
    recaptions: str | None = None
    validate_images: Literal["none", "header", "full"] = "header"
    batch_size: int = Field(256, ge=1, description="global batch (split evenly over workers)")
    decode_batch_size: int = Field(256, ge=1, description="rows per Ray Data read/join/decode batch (one block): "
                                   "larger blocks spread Ray's per-block costs over more images")
    decode_cpus: float = Field(1.0, gt=0, description="CPUs per Ray Data decode task (fractional allowed)")
    decode_on: Literal["cpu", "worker", "gpu"] = Field(
        "cpu", description="where training images are decoded: cpu: Ray Data tasks (scales over every CPU of the "
        "cluster; whole images travel through the object store); worker: Ray Data checks headers and ships the "
        "encoded bytes, the train worker's collate threads decode + crop them on its CPU (the same pixels as cpu, "
        "less per-image overhead, but only the collate threads' cores: prefetch_batches, at most 4); gpu: as worker, "
        "decoded on the worker's GPU (nvJPEG, pretrain/gpu_decode.py). Eval rows always decode in Ray Data")
    shuffle_buffer: int = Field(0, ge=0, description="local shuffle buffer rows per worker (seeded per epoch)")
    prefetch_batches: int = Field(2, ge=0)
    cache: bool = Field(False, description="decode the training set once into Ray's object store and iterate that "
                        "each epoch (sets that fit in memory: small runs, many epochs); crops stay per epoch")
    count_errors: bool = Field(True, description="a pass over the joined rows before training to count skips")
    loader: Literal["auto", "ray", "local"] = Field(
        "auto", description="what reads the rows: ray: Ray Data tasks (on every CPU of the cluster); local: this "
        "process and `local_workers` DataLoader worker processes, no Ray at all (ray.in_process runs only; "
        "pretrain/local_data.py); auto: local for an in-process run that joins no cluster (ray.address and "
        "$RAY_ADDRESS unset) and decodes on the CPU, else ray")
    local_workers: int = Field(1, ge=0, description="data.loader local: DataLoader worker processes that decode, "
                               "crop and tokenise beside the training step (0: in the training process)")
    sample_log: bool = Field(False, description="every rank appends the keys it trains on, per step, to "
                             "out_dir/samples/rank<r>.jsonl (audits which samples a run, or a resumed run, saw)")


class CaptionConfig(Config):
    """Which caption each sample trains with (pretrain/captions.py)."""

    policy: Literal["real", "synthetic", "mix", "both"] = "real"
    mix_p: float = Field(0.5, ge=0, le=1, description="mix: probability of a synthetic caption")
    min_score: float | None = Field(None, description="synthetic captions whose CLIP score (the recaption stage's "
                                    "syn_scores) is below this are never drawn; a row left with none trains its real "
                                    "caption under mix, else is skipped (below_min_score); no effect under real")


class DistillConfig(Config):
    """DataCompDR's distillation from the teacher embeddings in its shards (pretrain/distill.py), as ml-mobileclip's
    run_datacompdr12m.sh trains: `--distill-loss-weights 0.0 1.0 --distill-logit-scale 100
    --distill-teacher-dimension 768 768 --distill-average-after-softmax`. CLIP models only; the student's image is
    the stored view (crop + RandAugment, pretrain/dr_views.py) its teacher embedding was made from."""

    enabled: bool = False
    weights: tuple[float, float] = (0.0, 1.0)   # (contrastive, distillation)
    logit_scale: float = Field(100.0, gt=0)     # the teachers'
    teacher_dims: list[int] = [768, 768]        # the blocks of the stored embedding, one per teacher
    slots: list[Literal["real", "synthetic"]] = ["real", "synthetic"]  # caption slots with a distillation term

    @model_validator(mode="after")
    def _valid(self):
        if min(self.weights) < 0 or sum(self.weights) <= 0:
            raise ValueError(f"loss.distill.weights {list(self.weights)}: (contrastive, distillation), >= 0, "
                             "not both 0")
        if not self.teacher_dims or min(self.teacher_dims) <= 0:
            raise ValueError(f"loss.distill.teacher_dims {self.teacher_dims}: one positive size per teacher")
        if not self.slots or len(set(self.slots)) != len(self.slots):
            raise ValueError(f"loss.distill.slots {self.slots}: real and/or synthetic, each once")
        return self


class LossConfig(Config):
    kind: Literal["auto", "clip", "siglip", "coca"] = "auto"   # auto: coca for CoCa models, siglip if logit_bias
    coca_caption_weight: float = Field(2.0, ge=0)               # open_clip_train defaults
    coca_contrastive_weight: float = Field(1.0, ge=0)
    distill: DistillConfig = DistillConfig()


class EvalConfig(Config):
    """Held-out retrieval (R@1/R@5 both ways): the first `holdout` usable rows, or the rows of `path`; zero-shot
    classification on the ImageFolder `zeroshot.root` when set (as `clipdense eval` runs it), both every
    `train.eval_every` steps and at the end."""

    holdout: int = Field(0, ge=0)
    path: str | list[str] | None = None
    recaptions: str | None = None
    caption: Literal["real", "synthetic"] = "real"
    max_rows: int = Field(1000, ge=2)
    batch_size: int = Field(128, ge=1)
    zeroshot: ZeroShotConfig = ZeroShotConfig()


class PretrainTrain(TrainConfig):
    optim: OptimConfig = OptimConfig(lr=5e-4, weight_decay=0.2, betas=(0.9, 0.98), eps=1e-6, grad_clip=1.0)
    schedule: ScheduleConfig = ScheduleConfig(kind="cosine", warmup_steps=10, total_steps=100)
    out_dir: str = "runs/pretrain"


class PretrainConfig(Config):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    captions: CaptionConfig = CaptionConfig()
    loss: LossConfig = LossConfig()
    eval: EvalConfig = EvalConfig()
    train: PretrainTrain = PretrainTrain()
    ray: RayConfig = RayConfig()  # in_process true: train in this process (world size 1); data: see data.loader
    tracking: TrackingConfig = TrackingConfig()  # progress lines, TensorBoard / MLflow / W&B (train/tracking.py)

    @model_validator(mode="after")
    def _batch_divides(self):
        sc = self.train.scaling
        counts = [1] if self.ray.in_process else list(sc.worker_counts())
        bad = [n for n in counts if self.data.batch_size % n]
        if bad and sc.elastic and not self.ray.in_process:  # the global batch stays; each size splits it evenly
            raise ValueError(f"data.batch_size ({self.data.batch_size}) must be divisible by every worker count "
                             f"an elastic run may use (train.scaling.min_workers..num_workers = "
                             f"{counts[0]}..{counts[-1]}); not by {bad[0]}")
        if bad:
            raise ValueError(f"data.batch_size ({self.data.batch_size}) must be divisible by "
                             f"train.scaling.num_workers ({bad[0]})")
        if sc.elastic and not self.ray.in_process and self.data.shuffle_buffer:  # a resize mid-epoch would
            # refill each worker's buffer from another split of the stream: samples repeated and skipped
            raise ValueError("data.shuffle_buffer cannot be used with an elastic run (train.scaling.min_workers < "
                             "num_workers): the samples of an epoch changing size would not each train once")
        d, policy = self.loss.distill, self.captions.policy
        if d.enabled and policy != "both" and d.slots != [policy]:
            raise ValueError(f"loss.distill.slots {d.slots} need captions.policy both (or real / synthetic for that "
                             f"one slot), not {policy!r}")
        if self.data.decode_on == "gpu" and not self.train.scaling.use_gpu:
            raise ValueError("data.decode_on gpu needs train.scaling.use_gpu true (it decodes on the train worker's "
                             "GPU)")
        if self.data.decode_on != "cpu" and d.enabled:
            raise ValueError(f"data.decode_on {self.data.decode_on} does not take loss.distill (its stored views are "
                             "drawn from images decoded in Ray Data); use data.decode_on cpu")
        if self.data.loader == "local" and not self.ray.in_process:
            raise ValueError("data.loader local reads the rows in the training process: it needs ray.in_process true")
        if self.data.loader == "local" and self.data.decode_on == "gpu":
            raise ValueError("data.loader local decodes in DataLoader worker processes, not on a GPU: use "
                             "data.decode_on cpu, or data.loader ray")
        if d.enabled and self.loss.kind in ("siglip", "coca"):
            raise ValueError(f"loss.distill is DataCompDR's CLIP loss; loss.kind {self.loss.kind!r} cannot take it")
        return self

    def reads_locally(self) -> bool:
        """Whether the rows are read in this process (`data.loader`, its `auto` resolved; $RAY_ADDRESS is read
        now: the stage's entry asks once)."""
        if self.data.loader != "auto":
            return self.data.loader == "local"
        return bool(self.ray.in_process) and self.ray.target() is None and self.data.decode_on != "gpu"
