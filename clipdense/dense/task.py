"""The dense finetune as a `clipdense.train.TrainTask`: the one training runner (`fit` on Ray Train, `fit_local`
in-process) owns the loop, AdamW, schedule, checkpoints and resume; this class says what to train and how to score,
asking the task's module (`dense/tasks/`, by `cfg.task`) for the datasets, head, collate, loss and evaluator.

Batches are deterministic in (train.seed, epoch, rank, world size): each epoch is a seeded permutation of the
training subset (repeated when the subset is smaller than one global batch), cut into global batches whose
rank-th slice goes to rank r (the remainder is dropped, so every rank yields the same number of batches)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn
from torch.utils.data import DataLoader, Dataset

from clipdense.config import ConfigError, DataError, run_provenance
from clipdense.dense.backbones import BackboneSpec, backbone_family, resolve_backbone
from clipdense.dense.base_config import FinetuneBase
from clipdense.dense.optim import layer_decay_param_groups, lr_scale_record
from clipdense.dense.tasks import TaskKind, task_of
from clipdense.train.task import TrainContext, TrainTask


def epoch_batches(n: int, per_rank: int, rank: int, world_size: int, seed: int, epoch: int) -> list[list[int]]:
    """This rank's sample indices, batch by batch, for one epoch (see the module docstring)."""
    rng = np.random.default_rng([seed, epoch, 0x5EED])
    g = per_rank * world_size
    order: list[int] = []
    while len(order) < g:
        order.extend(rng.permutation(n).tolist())
    return [order[b * g + rank * per_rank: b * g + (rank + 1) * per_rank] for b in range(len(order) // g)]


@dataclass(frozen=True)
class FinetuneDatasets:
    """A finetune's training and evaluation sets, read once where the stage starts (file lists, annotations; the
    workers read the images)."""

    train: Dataset
    eval: Dataset


def build_datasets(kind: TaskKind, cfg: FinetuneBase) -> FinetuneDatasets:
    """Both sets of the task; a bad path or annotation file, or no training sample, is a one-line error."""
    datasets = FinetuneDatasets(kind.train_dataset(cfg), kind.eval_dataset(cfg))
    if len(datasets.train) == 0:
        raise DataError(f"{cfg.data.root}: no training samples for task {cfg.task}")
    return datasets


def _scalars(d: dict) -> dict[str, float]:
    return {k: float(v) for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class DenseTask(TrainTask):
    """`datasets` and `backbone`: what `resolve_finetune` resolved once for the run; a task made on its own (tests,
    benches) resolves them from `cfg` itself."""

    find_unused_parameters = False

    def __init__(self, cfg: FinetuneBase, datasets: FinetuneDatasets | None = None,
                 backbone: BackboneSpec | None = None):
        self.cfg = cfg
        self.kind = task_of(cfg)
        self.datasets = datasets
        self.backbone_spec = backbone or resolve_backbone(cfg.backbone, self.kind.img_size(cfg), self.kind.neck(cfg))
        self.backbone: nn.Module | None = None
        self.provenance: dict = {}
        self.last_eval: dict = {}
        self.optim_record: dict = {}
        self.ctx = TrainContext()

    # ---- runner hooks ----
    def setup(self, ctx: TrainContext) -> None:
        self.ctx = ctx
        cfg = self.cfg
        gb, ws = cfg.data.batch_size, ctx.world_size
        if gb % ws:
            raise ConfigError(f"data.batch_size {gb} is not divisible by {ws} training workers")
        self.per_rank = gb // ws
        sync_bn = ws > 1 and ctx.device.type == "cuda"
        if self.per_rank < self.kind.min_batch_per_rank and not sync_bn:
            raise ConfigError(f"data.batch_size {gb} over {ws} workers leaves {self.per_rank} image per worker; "
                              "the decoder's BatchNorm needs >= 2 (SyncBatchNorm is used only on multi-GPU runs)")
        datasets = self.datasets if self.datasets is not None else build_datasets(self.kind, cfg)
        self.train_set = datasets.train
        self.eval_set = datasets.eval if ctx.is_main else None

    def build_model(self) -> nn.Module:
        cfg, kind = self.cfg, self.kind
        backbone = self.backbone_spec.build()
        model = kind.build_model(cfg, backbone, self.train_set)
        if self.ctx.world_size > 1 and self.ctx.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.backbone = backbone
        self.provenance = {**backbone.provenance, "model_params": sum(p.numel() for p in model.parameters())}
        return model

    def param_groups(self, model: nn.Module, optim_cfg) -> list[dict]:
        groups = layer_decay_param_groups(model, self.backbone, optim_cfg.weight_decay, optim_cfg.layer_decay,
                                          optim_cfg.min_lr_scale, trunk_lr_scale=self.cfg.backbone.lr_scale)
        self.optim_record = lr_scale_record(groups, optim_cfg.layer_decay, backbone_family(self.backbone))
        return groups

    def train_batches(self, ctx: TrainContext):
        batches = epoch_batches(len(self.train_set), self.per_rank, ctx.rank, ctx.world_size, ctx.seed, ctx.epoch)
        keyed = [[(i, ctx.epoch) for i in b] for b in batches[ctx.start_batch:]]
        if not keyed:
            return iter(())
        return iter(DataLoader(self.train_set, batch_sampler=keyed, num_workers=self.cfg.data.loader_workers,
                               collate_fn=self.kind.collate, pin_memory=ctx.device.type == "cuda"))

    def loss(self, model: nn.Module, batch, ctx: TrainContext):
        return self.kind.loss(model, batch, self.cfg, ctx.device)

    def batch_size(self, batch) -> int:
        return self.kind.batch_size(batch)

    def evaluate(self, model: nn.Module, ctx: TrainContext) -> dict[str, float]:
        """Rank 0 scores the validation set; the final evaluation also writes predictions if asked."""
        if not ctx.is_main:
            return {}
        final = ctx.step + 1 >= ctx.total_steps  # the runner's final eval comes after the last step
        save = self.cfg.save_predictions if final else None
        self.last_eval = self.kind.evaluate(model, self.eval_set, self.cfg, ctx.device, save)
        return _scalars(self.last_eval)

    def export(self, model: nn.Module, out_dir: Path) -> dict:
        """metrics.json: every metric, the resolved config, backbone provenance, the data actually used."""
        record = metrics_record(self.cfg, self.last_eval, self.provenance,
                                {"train_samples": len(self.train_set), "eval_samples": len(self.eval_set or [])})
        record.update(self.optim_record)  # layer_decay (family, resolved rate), lr_scales (one row per optimizer group)
        path = Path(out_dir) / "metrics.json"
        path.write_text(json.dumps(record, indent=2, default=_json_default))
        return {"metrics_json": str(path)}


def _json_default(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return str(v)


def metrics_record(cfg: FinetuneBase, metrics: dict, provenance: dict, data: dict) -> dict:
    """`provenance` is the backbone's; the run's own (code version, config hash without where it writes, versions)
    goes under "provenance"."""
    config = cfg.model_dump(mode="json")
    return {"task": cfg.task, "head": task_of(cfg).head_name(cfg),
            "metrics": {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()},
            "backbone": provenance,
            "data": {"root": cfg.data.root, "fraction": cfg.data.fraction, "seed": cfg.data.seed, **data},
            "save_predictions": cfg.save_predictions, "config": config,
            "provenance": run_provenance(config, exclude=("out", "fresh", "out_dir"))}


@dataclass(frozen=True)
class DenseTaskFactory:
    """One finetune resolved once (`resolve_finetune`): the validated config, its datasets and its backbone. The
    runner calls it inside each worker (a Ray Train run pickles it to them)."""

    cfg: FinetuneBase
    datasets: FinetuneDatasets
    backbone: BackboneSpec

    def __call__(self) -> DenseTask:
        return DenseTask(self.cfg, self.datasets, self.backbone)


def resolve_finetune(cfg: FinetuneBase) -> DenseTaskFactory:
    """Read the datasets and resolve the backbone (open_clip or timm, checkpoint checked) once, so a bad path,
    annotation file or backbone fails here with its one-line error, before any worker starts."""
    kind = task_of(cfg)
    datasets = build_datasets(kind, cfg)
    return DenseTaskFactory(cfg, datasets, resolve_backbone(cfg.backbone, kind.img_size(cfg), kind.neck(cfg)))
