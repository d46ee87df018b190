"""Config of the one training runner; stages embed `TrainConfig` (as key `train`) in their own configs."""
from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from clipdense.config import Config
from clipdense.data.storage import StorageKeys


class OptimConfig(Config):
    """AdamW. Defaults follow open_clip / the DataCompDR ViT-B/16 recipe except beta2 (open_clip default 0.98)."""

    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.2, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-6, gt=0)
    grad_clip: float | None = Field(1.0, description="max global grad norm; null = no clipping")
    fused: bool = Field(True, description="torch's fused AdamW kernel (CPU and CUDA: one kernel over every "
                        "parameter; the same update); false: torch's default (per-tensor on CPU, for-each on CUDA)")
    layer_decay: float | None = Field(None, gt=0, le=1, description="layer-wise lr decay (tasks that support it)")
    min_lr_scale: float = Field(1e-3, ge=0, le=1, description="refuse a layer decay that trains any parameter group "
                                                              "below this fraction of lr (it would be all but frozen)")


class ScheduleConfig(Config):
    kind: Literal["cosine", "poly", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    total_steps: int = Field(100, ge=1)
    power: float = Field(1.0, gt=0, description="poly decay power")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="floor of the decay, as a fraction of lr")


class ScalingConfig(Config):
    """Where training runs. `min_workers` < `num_workers` makes the Ray Train run elastic."""

    num_workers: int = Field(1, ge=1)
    min_workers: int | None = Field(None, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0, description="fractional allowed: leave CPUs for Ray Data")
    gpus_per_worker: float = Field(1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="bf16: bf16 autocast (CPU or GPU); fp32: none; auto: bf16 on GPU, and on a CPU with "
        "native bf16 (AVX-512 BF16 or AMX) for models at least 128 wide (their typical linear layer), where it "
        "measured faster (clip-demo ~1.2x; clip-tiny, 64 wide, ran slower: fp32); else fp32. The run's summary "
        "records what auto resolved to; CLIPDENSE_CPU_BF16=0 keeps auto at fp32 on CPUs (train/precision.py)")
    grad_checkpointing: bool = False
    compile: bool = False
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    resize_interval_s: float = Field(60.0, ge=0, description="elastic: how often Ray Train checks whether more "
                                     "workers fit now, to grow the group back (elastic_resize_monitor_interval_s); "
                                     "below 20 s the driver also has Ray's autoscaling coordinator re-read the "
                                     "cluster that often (train/resize_ticks.py)")
    start_timeout_s: float | None = Field(None, gt=0, description="how long a worker group may take to start before "
                                          "Ray Train tries again, elastic: at the size that fits then "
                                          "(RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S); null: Ray's (60 s)")

    @model_validator(mode="after")
    def _min_le_max(self):
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError(f"min_workers ({self.min_workers}) > num_workers ({self.num_workers})")
        return self

    @property
    def elastic(self) -> bool:
        return self.min_workers is not None and self.min_workers < self.num_workers

    def worker_counts(self) -> range:
        """Every worker-group size this run may train with (elastic: min_workers..num_workers)."""
        return range(self.min_workers if self.elastic else self.num_workers, self.num_workers + 1)


class CheckpointConfig(StorageKeys):
    # the YAML key `storage` names the field `location`: `storage(uri)` is StorageKeys' method
    model_config = ConfigDict(validate_by_alias=True, validate_by_name=False, serialize_by_alias=True)

    every_steps: int = Field(0, ge=0, description="0 = only at the end")
    keep: int | None = Field(2, ge=1, description="checkpoints kept (Ray num_to_keep); null = all")
    location: str | None = Field(None, alias="storage", description="where Ray Train keeps the run's checkpoints "
                                 "and state: a local dir or s3://bucket/prefix (survives the cluster: a rerun "
                                 "resumes from it); default: out_dir")


class TrainConfig(Config):
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    scaling: ScalingConfig = ScalingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(0, ge=0, description="0 = only at the end")
    seed: int = 0
    out_dir: str = "runs/train"
    name: str | None = Field(None, description="Ray Train run name (default: the out_dir's basename)")
    max_failures: int = Field(0, ge=-1, description="worker-group restarts from the last checkpoint; -1 = forever")
    stop_at_step: int | None = Field(None, ge=1, description="end early as if killed here (tests of resume)")
    deterministic: bool = Field(False, description="torch.use_deterministic_algorithms (slower; CPU resume tests)")
