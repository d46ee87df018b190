"""The CLIP / SigLIP / CoCa pretraining step plugged into the one runner (`clipdense.train`).

The task gets what the stage's entry resolved once (pretrain/run.py): the validated config, the model with its
preprocessing and loss kind (pretrain/model.py) and the zero-shot set. On each worker it adds the objective of that
kind (pretrain/losses.py), the batches of its Ray Data shard through the collate (pretrain/batches.py), the
held-out retrieval and zero-shot figures (eval's metrics, the same as `clipdense eval`) and, on rank 0, the export.
"""
from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path

import torch
from open_clip.transform import PreprocessCfg, image_transform_v2

from clipdense.config import ConfigError
from clipdense.eval.metrics import retrieval_metrics
from clipdense.eval.zeroshot import ZeroShotSet, evaluate_zeroshot
from clipdense.models import tokenizer_for
from clipdense.models.export import export_model
from clipdense.pretrain.batches import Collate
from clipdense.pretrain.config import PretrainConfig
from clipdense.pretrain.data import typed_collate
from clipdense.pretrain.distill import distill_slots
from clipdense.pretrain.local_data import LocalRows
from clipdense.pretrain.losses import build_objective, clamp_logit_scale
from clipdense.pretrain.model import PretrainModel
from clipdense.train.task import TrainContext, TrainTask


class ClipPretrainTask(TrainTask):
    """Everything but the loop: the model, batches from the Ray Data shard, the objective, eval, export."""

    def __init__(self, cfg: PretrainConfig, model: PretrainModel, zeroshot: ZeroShotSet | None = None):
        self.cfg, self.model, self.zeroshot = cfg, model, zeroshot
        self.kind, self.pp = model.loss_kind, model.preprocess
        self.distill_slots = distill_slots(cfg.captions.policy, cfg.loss.distill)

    def setup(self, ctx: TrainContext) -> None:
        self.ctx = ctx  # the runner keeps it current (step, epoch)
        self.local_batch = max(1, self.cfg.data.batch_size // ctx.world_size)
        if self.cfg.data.decode_on == "gpu" and torch.device(ctx.device).type != "cuda":
            raise ConfigError(f"data.decode_on gpu: this train worker has no CUDA device ({ctx.device})")
        self.objective = build_objective(self.kind, self.cfg.loss, self.distill_slots, ctx.rank, ctx.world_size)

    def build_model(self):
        return self.model.module  # built once, at the entry (in a Ray worker: this worker's unpickled copy)

    def _collate(self, epoch: int, train: bool) -> Collate:
        cfg, gpu = self.cfg, train and self.cfg.data.decode_on == "gpu"
        return Collate(model_name=self.model.name, image_size=self.pp.size, mean=self.pp.mean, std=self.pp.std,
                       policy=cfg.captions.policy if train else cfg.eval.caption, seed=cfg.train.seed, epoch=epoch,
                       mix_p=cfg.captions.mix_p, min_score=cfg.captions.min_score if train else None, train=train,
                       distill_slots=self.distill_slots if train else (),
                       decode_on=cfg.data.decode_on if train else "cpu", decode_device=self.ctx.device if gpu else None)

    def train_batches(self, ctx: TrainContext):
        shard = ctx.dataset_shard
        if shard is None:
            raise RuntimeError("pretrain needs the 'train' dataset")
        d = self.cfg.data
        shuffle = {"local_shuffle_buffer_size": d.shuffle_buffer, "local_shuffle_seed": ctx.seed + ctx.epoch} \
            if d.shuffle_buffer else {}
        if isinstance(shard, LocalRows):  # data.loader local (pretrain/local_data.py)
            return shard.train_batches(self._collate(ctx.epoch, True), self.local_batch, ctx.epoch, ctx.start_batch,
                                       ctx.seed)
        if self.cfg.train.scaling.elastic and not self.cfg.ray.in_process:
            return self._global_slices(shard, ctx, shuffle)
        collate = typed_collate(self._collate(ctx.epoch, True))
        it = shard.iter_torch_batches(batch_size=self.local_batch, collate_fn=collate, drop_last=True,
                                      prefetch_batches=d.prefetch_batches, **shuffle)
        return itertools.islice(it, ctx.start_batch, None)

    def _global_slices(self, stream, ctx: TrainContext, shuffle: dict):
        """Elastic runs: every worker reads the whole (unsplit) stream in global batches and keeps the rows
        [rank * local, (rank + 1) * local) of each, so global batch b is the stream's rows [b * G, (b + 1) * G)
        whatever the worker count: a run resumed on fewer (or more) workers at batch b trains exactly the rows
        the old group had not. The price: each worker reads and decodes the whole stream."""
        lo = ctx.rank * self.local_batch
        collate = self._collate(ctx.epoch, True)
        batches = stream.iter_batches(batch_size=self.cfg.data.batch_size, batch_format="numpy", drop_last=True,
                                      prefetch_batches=self.cfg.data.prefetch_batches, **shuffle)
        for batch in itertools.islice(batches, ctx.start_batch, None):
            yield collate({k: v[lo:lo + self.local_batch] for k, v in batch.items()})

    def _log_samples(self, batch, ctx: TrainContext) -> None:
        path = ctx.out_dir / "samples" / f"rank{ctx.rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps({"step": ctx.step, "epoch": ctx.epoch, "rank": ctx.rank,
                                "world_size": ctx.world_size, "pid": os.getpid(), "time": time.time(),
                                "keys": list(batch["keys"])}) + "\n")

    def loss(self, model, batch, ctx: TrainContext):
        if self.cfg.data.sample_log:
            self._log_samples(batch, ctx)
        dev = ctx.device
        image = batch["image"].to(dev, non_blocking=True)
        texts = [t.to(dev, non_blocking=True) for t in batch["texts"]]
        # `both`: rows without a real caption train the synthetic term only (slot 0 masked for them)
        mask = batch["real_mask"].to(dev) if "real_mask" in batch else None
        total, metrics = self.objective(model, image, texts, mask, batch)
        if "decode_fallbacks" in batch:  # data.decode_on gpu: rows decoded on the CPU so far
            metrics["decode_fallbacks"] = float(batch["decode_fallbacks"])
        return total, metrics

    def after_step(self, model, ctx: TrainContext) -> None:
        clamp_logit_scale(model)

    def evaluate(self, model, ctx: TrainContext) -> dict[str, float]:
        if not ctx.is_main:
            return {}
        return {**self._retrieval(model, ctx), **self._zeroshot(model, ctx)}

    def _zeroshot(self, model, ctx: TrainContext) -> dict[str, float]:
        """`clipdense eval`'s zero-shot figures as metrics; the full record (per class, errors) in zeroshot.jsonl."""
        if self.zeroshot is None:
            return {}
        # the eval transform open_clip's create_model_and_transforms builds
        preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
        zs, zset = self.cfg.eval.zeroshot, self.zeroshot
        if not hasattr(self, "tokenizer"):
            self.tokenizer = tokenizer_for(self.model.name)
        out = evaluate_zeroshot(model, self.tokenizer, preprocess, zset.index, zset.classnames, zset.templates,
                                device=ctx.device, batch_size=zs.batch_size, workers=zs.workers,
                                classes_per_batch=zs.classes_per_batch)  # under the runner's autocast
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        with open(ctx.out_dir / "zeroshot.jsonl", "a") as f:
            f.write(json.dumps({"step": ctx.step, **out}) + "\n")
        return {f"zeroshot_{k}": out[k] for k in ("top1", "top5", "mean_per_class", "images")}

    def _retrieval(self, model, ctx: TrainContext) -> dict[str, float]:
        eval_it = ctx.dataset_shards.get("eval")
        if eval_it is None:
            return {}
        imgs, txts = [], []
        collate = self._collate(0, False)
        for batch in eval_it.iter_batches(batch_size=self.cfg.eval.batch_size, batch_format="numpy"):
            b = collate(batch)
            imgs.append(model.encode_image(b["image"].to(ctx.device), normalize=True).float().cpu())
            txts.append(model.encode_text(b["texts"][0].to(ctx.device), normalize=True).float().cpu())
        if not imgs:
            return {}
        metrics = retrieval_metrics(torch.cat(imgs), torch.cat(txts))
        return {**metrics, "rows": float(sum(len(i) for i in imgs))}

    def export(self, model, out_dir: Path) -> dict:
        return export_model(model, Path(out_dir) / "export", self.model.name, self.ctx.step)
