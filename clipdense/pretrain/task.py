"""The CLIP / SigLIP / CoCa pretraining step plugged into the one runner (`clipdense.train`).

Losses are open_clip's: ClipLoss(local_loss=True, gather_with_grad=True) across ranks, SigLipLoss, CoCaLoss.
Policy `both` (DataCompDR) adds the loss on (image, synthetic caption) to the loss on (image, real caption); rows
without a real caption are masked out of the real term (masked_clip_loss / masked_siglip_loss, equal to open_clip's
losses when no row is masked).
`loss.distill` (DataCompDR): weights x (the contrastive terms, the distillation terms of pretrain/distill.py on the
real and synthetic slots, from the teacher embeddings the collate selects for each row's stored view and caption).
After every optimizer step logit_scale is clamped to [0, ln 100], as open_clip_train does.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from clipdense.models.export import export_open_clip_dir
from clipdense.pretrain.batches import Collate
from clipdense.pretrain.config import PretrainConfig
from clipdense.train.task import TrainContext, TrainTask

LOGIT_SCALE_MAX = math.log(100)  # open_clip_train clamps logit_scale to [0, ln 100] after every optimizer step


def loss_kind(model, requested: str = "auto") -> str:
    if requested != "auto":
        return requested
    from open_clip import CoCa

    if isinstance(model, CoCa):
        return "coca"
    return "siglip" if getattr(model, "logit_bias", None) is not None else "clip"


def build_loss(kind: str, rank: int, world_size: int, caption_weight: float = 2.0, contrastive_weight: float = 1.0):
    from open_clip.loss import ClipLoss, CoCaLoss, SigLipLoss

    if kind == "coca":
        return CoCaLoss(caption_loss_weight=caption_weight, clip_loss_weight=contrastive_weight, pad_id=0,
                        local_loss=True, gather_with_grad=True, cache_labels=True, rank=rank, world_size=world_size)
    if kind == "siglip":
        return SigLipLoss(cache_labels=True, rank=rank, world_size=world_size)
    return ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True, rank=rank, world_size=world_size)


def _gathered(image_f: torch.Tensor, text_f: torch.Tensor, mask: torch.Tensor, rank: int, world_size: int):
    """All ranks' features (with gradients, as open_clip's gather_with_grad) and masks; the same collectives on every
    rank whatever its mask holds."""
    if world_size == 1:
        return image_f, text_f, mask
    import torch.distributed as dist
    from open_clip.loss import gather_features

    all_img, all_txt = gather_features(image_f, text_f, local_loss=True, gather_with_grad=True, rank=rank,
                                       world_size=world_size)
    flags = mask.to(torch.uint8)  # not every backend gathers bool tensors
    masks = [torch.empty_like(flags) for _ in range(world_size)]
    dist.all_gather(masks, flags)
    return all_img, all_txt, torch.cat(masks).bool()


_EXCLUDED = -1e4  # a logit no softmax over scaled cosines (|x| <= 100) gives weight to, finite so no inf * 0


def masked_clip_loss(image_f, text_f, logit_scale, mask, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """open_clip's ClipLoss (local_loss, gather_with_grad) over the rows whose `mask` is true: a masked row's text is
    neither an anchor nor a candidate; its image stays a candidate (a true negative for the other texts).
    With every row kept it equals ClipLoss."""
    all_img, all_txt, all_mask = _gathered(image_f, text_f, mask, rank, world_size)
    n = image_f.shape[0]
    labels = torch.arange(n, device=image_f.device) + n * rank
    per_image = (logit_scale * image_f @ all_txt.T).masked_fill(~all_mask[None, :], _EXCLUDED)
    per_text = logit_scale * text_f @ all_img.T
    ce = F.cross_entropy(per_image, labels, reduction="none") + F.cross_entropy(per_text, labels, reduction="none")
    ce = torch.where(mask, ce, torch.zeros_like(ce))
    return ce.sum() / (2 * mask.sum().clamp(min=1))


def masked_siglip_loss(image_f, text_f, logit_scale, logit_bias, mask, rank: int = 0,
                       world_size: int = 1) -> torch.Tensor:
    """open_clip's SigLipLoss (every image against every rank's texts) over the kept rows' texts and images."""
    _, all_txt, all_mask = _gathered(image_f, text_f, mask, rank, world_size)
    n = image_f.shape[0]
    logits = logit_scale * image_f @ all_txt.T + logit_bias
    labels = -torch.ones_like(logits)
    labels[torch.arange(n), torch.arange(n) + n * rank] = 1.0
    keep = mask[:, None] & all_mask[None, :]
    pair = -F.logsigmoid(labels * logits)
    return torch.where(keep, pair, torch.zeros_like(pair)).sum() / mask.sum().clamp(min=1)


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """R@k both ways for paired rows (row i of each matches): image->text and text->image, plus their mean."""
    sims = F.normalize(image_features.float(), dim=-1) @ F.normalize(text_features.float(), dim=-1).T
    n = sims.shape[0]
    target = torch.arange(n)
    out = {}
    for name, s in (("i2t", sims), ("t2i", sims.T)):
        rank = (s > s[target, target].unsqueeze(1)).sum(1)  # how many candidates beat the true pair
        for k in ks:
            out[f"{name}_R@{k}"] = (rank < k).float().mean().item()
    out["mean_R@1"] = (out["i2t_R@1"] + out["t2i_R@1"]) / 2
    return out


class ClipPretrainTask(TrainTask):
    """Everything but the loop: model, batches from the Ray Data shard, the open_clip loss, eval, export."""

    def __init__(self, cfg: dict, preprocess: dict):
        self.cfg_dict, self.pp = cfg, preprocess

    def setup(self, ctx: TrainContext) -> None:
        self.cfg = PretrainConfig.model_validate(self.cfg_dict)
        self.ctx = ctx  # the runner keeps it current (step, epoch)
        self.rank, self.world_size = ctx.rank, ctx.world_size
        self.local_batch = max(1, self.cfg.data.batch_size // ctx.world_size)
        if self.cfg.data.decode_on == "gpu" and torch.device(ctx.device).type != "cuda":
            from clipdense.config import ConfigError

            raise ConfigError(f"data.decode_on gpu: this train worker has no CUDA device ({ctx.device})")
        self.zeroshot = None
        zs = self.cfg.eval.zeroshot
        if zs.root and ctx.is_main:  # (folder index, class names, templates), listed once
            from clipdense.eval.zeroshot import index_folder, resolve_prompts

            index = index_folder(zs.root, zs.max_images, "eval.zeroshot.root")
            self.zeroshot = (index, *resolve_prompts(index, zs.classnames, zs.templates, "eval.zeroshot"))

    def build_model(self):
        from clipdense.models import create_clip

        model = create_clip(self.cfg.model.name, self.cfg.model.pretrained, output_dict=True)
        lc = self.cfg.loss
        self.kind = loss_kind(model, lc.kind)
        self.loss_fn = build_loss(self.kind, self.rank, self.world_size, lc.coca_caption_weight,
                                  lc.coca_contrastive_weight)
        self.distill = None
        if lc.distill.enabled:
            from clipdense.config import ConfigError
            from clipdense.pretrain.distill import DistillLoss

            if self.kind != "clip":
                raise ConfigError(f"loss.distill is DataCompDR's CLIP loss; {self.cfg.model.name} trains with "
                                  f"{self.kind}")
            self.distill = DistillLoss(lc.distill.teacher_dims, lc.distill.logit_scale, self.rank, self.world_size)
        return model

    def distill_slots(self) -> tuple:
        """((caption slot index, "real" | "synthetic"), ...) that get a distillation term."""
        d = self.cfg.loss.distill
        if not d.enabled:
            return ()
        order = ["real", "synthetic"] if self.cfg.captions.policy == "both" else [self.cfg.captions.policy]
        return tuple((order.index(kind), kind) for kind in d.slots)

    def _collate(self, epoch: int, train: bool) -> Collate:
        return Collate(model_name=self.cfg.model.name, image_size=self.pp["size"], mean=self.pp["mean"],
                       std=self.pp["std"], policy=self.cfg.captions.policy if train else self.cfg.eval.caption,
                       seed=self.cfg.train.seed, epoch=epoch, mix_p=self.cfg.captions.mix_p, train=train,
                       distill_slots=self.distill_slots() if train else (),
                       decode_on=self.cfg.data.decode_on if train else "cpu",
                       decode_device=self.ctx.device if train and self.cfg.data.decode_on == "gpu" else None)

    def train_batches(self, ctx: TrainContext):
        shard = ctx.dataset_shard
        if shard is None:
            raise RuntimeError("pretrain needs the 'train' Ray dataset")
        d = self.cfg.data
        shuffle = {"local_shuffle_buffer_size": d.shuffle_buffer, "local_shuffle_seed": ctx.seed + ctx.epoch} \
            if d.shuffle_buffer else {}
        if self.cfg.train.scaling.elastic and not self.cfg.ray.in_process:
            return self._global_slices(shard, ctx, shuffle)
        it = shard.iter_torch_batches(batch_size=self.local_batch, collate_fn=self._collate(ctx.epoch, True),
                                      drop_last=True, prefetch_batches=d.prefetch_batches, **shuffle)
        return itertools.islice(it, ctx.start_batch, None)

    def _global_slices(self, stream, ctx: TrainContext, shuffle: dict):
        """Elastic runs: every worker reads the whole (unsplit) stream in global batches and keeps the rows
        [rank * local, (rank + 1) * local) of each, so global batch b is the stream's rows [b * G, (b + 1) * G)
        whatever the worker count: a run resumed on fewer (or more) workers at batch b trains exactly the rows
        the old group had not. The price: each worker reads and decodes the whole stream."""
        global_batch = self.cfg.data.batch_size
        lo = ctx.rank * self.local_batch
        collate = self._collate(ctx.epoch, True)
        batches = stream.iter_batches(batch_size=global_batch, batch_format="numpy", drop_last=True,
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

    def _contrastive(self, out: dict, text_features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None:  # every rank takes this path under `both`, so the collectives match
            if self.kind == "siglip":
                return masked_siglip_loss(out["image_features"], text_features, out["logit_scale"],
                                          out["logit_bias"], mask, self.rank, self.world_size)
            return masked_clip_loss(out["image_features"], text_features, out["logit_scale"], mask, self.rank,
                                    self.world_size)
        if self.kind == "siglip":
            return self.loss_fn(out["image_features"], text_features, out["logit_scale"], out["logit_bias"])
        return self.loss_fn(out["image_features"], text_features, out["logit_scale"])

    def _masked_coca(self, out: dict, sl: slice, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CoCaLoss on the real-caption slot with masked rows left out: their captioning targets become padding
        (CoCaLoss ignores pad_id 0), their texts leave the contrastive term."""
        lc = self.cfg.loss
        clip_l = masked_clip_loss(out["image_features"][sl], out["text_features"][sl], out["logit_scale"], mask,
                                  self.rank, self.world_size) * lc.coca_contrastive_weight
        labels = out["labels"][sl].masked_fill(~mask[:, None], 0)
        logits = out["logits"][sl]
        if bool(mask.any()):
            cap_l = F.cross_entropy(logits.permute(0, 2, 1), labels, ignore_index=0)
        else:
            cap_l = logits.sum() * 0.0
        return clip_l, cap_l * lc.coca_caption_weight

    def loss(self, model, batch, ctx: TrainContext):
        if self.cfg.data.sample_log:
            self._log_samples(batch, ctx)
        dev = ctx.device
        image = batch["image"].to(dev, non_blocking=True)
        texts = [t.to(dev, non_blocking=True) for t in batch["texts"]]
        # `both`: rows without a real caption train the synthetic term only (slot 0 masked for them)
        mask = batch["real_mask"].to(dev) if "real_mask" in batch else None
        metrics: dict[str, float] = {}
        if self.kind == "coca":
            n = len(texts)  # `both`: each image once per caption slot (the decoder needs a caption per image)
            out = model(image.repeat(n, 1, 1, 1) if n > 1 else image, torch.cat(texts) if n > 1 else texts[0])
            total = 0.0
            b = image.shape[0]
            for i in range(n):
                sl = slice(i * b, (i + 1) * b)
                if i == 0 and mask is not None:
                    clip_l, cap_l = self._masked_coca(out, sl, mask)
                else:
                    clip_l, cap_l = self.loss_fn(out["image_features"][sl], out["text_features"][sl],
                                                 out["logits"][sl], out["labels"][sl], out["logit_scale"])
                total = total + clip_l + cap_l
                metrics[f"caption_loss_{i}"] = float(cap_l.detach())
        else:
            out = model(image, torch.cat(texts) if len(texts) > 1 else texts[0])
            tf = out["text_features"].chunk(len(texts)) if len(texts) > 1 else [out["text_features"]]
            w_contrastive = self.cfg.loss.distill.weights[0] if self.distill is not None else 1.0
            losses = [self._contrastive(out, t, mask if i == 0 else None) for i, t in enumerate(tf)] \
                if w_contrastive else []
            total = w_contrastive * sum(losses) if losses else 0.0
            if len(losses) > 1:
                metrics.update({"loss_real": float(losses[0].detach()), "loss_syn": float(losses[1].detach())})
            if self.distill is not None:
                total = total + self._distill_terms(out, tf, batch, metrics)
        metrics["logit_scale"] = float(out["logit_scale"].detach())
        if "decode_fallbacks" in batch:  # data.decode_on gpu: rows decoded on the CPU so far
            metrics["decode_fallbacks"] = float(batch["decode_fallbacks"])
        return total, metrics

    def _distill_terms(self, out: dict, tf: list, batch: dict, metrics: dict) -> torch.Tensor:
        """loss.distill's weight x the distillation terms of its slots (pretrain/distill.py); a batch without
        DataCompDR teacher embeddings takes all-masked zeros, so every rank runs the same collectives."""
        slots = self.distill_slots()
        b = out["image_features"].shape[0]
        if "distill_mask" in batch:
            t_img, t_txt, keep = batch["distill_image_emb"], batch["distill_text_emb"], batch["distill_mask"]
        else:
            d = self.distill.teacher_dim
            t_img, t_txt = torch.zeros(b, d), torch.zeros(b, len(slots), d)
            keep = torch.zeros(b, len(slots), dtype=torch.bool)
        total = 0.0
        for j, (slot, kind) in enumerate(slots):
            term = self.distill(out["image_features"], tf[slot], out["logit_scale"], t_img, t_txt[:, j], keep[:, j])
            metrics[f"distill_{kind}"] = float(term.detach())
            total = total + term
        metrics["distill_rows"] = float(keep.any(1).sum())
        return self.cfg.loss.distill.weights[1] * total

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
        from open_clip.transform import PreprocessCfg, image_transform_v2

        from clipdense.eval.zeroshot import evaluate_zeroshot
        from clipdense.models import tokenizer_for

        # the eval transform open_clip's create_model_and_transforms builds
        preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
        zs = self.cfg.eval.zeroshot
        if not hasattr(self, "tokenizer"):
            self.tokenizer = tokenizer_for(self.cfg.model.name)
        out = evaluate_zeroshot(model, self.tokenizer, preprocess, *self.zeroshot,
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
        return export_model(model, Path(out_dir) / "export", self.cfg.model.name, self.ctx.step)


def clamp_logit_scale(model) -> None:
    """open_clip_train's clamp, for every model kind (CLIP, SigLIP, CoCa): without it the temperature can grow
    past 100 at high lr and destabilise training."""
    with torch.no_grad():
        model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)


def export_model(model, out: Path, name: str, steps: int | None = None) -> dict:
    """`model.pt` (open_clip.create_model(name, pretrained=...) loads it once our model configs are registered),
    `visual.pt` (image tower), `open_clip/` (plain open_clip loads it as `local-dir:`), export.json."""
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu() for k, v in model.state_dict().items()}
    torch.save(sd, out / "model.pt")
    torch.save({k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}, out / "visual.pt")
    portable = export_open_clip_dir(model, name, out / "open_clip")  # loads with plain open_clip, no clipdense
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    info = {"name": name, "model": str(out / "model.pt"), "visual": str(out / "visual.pt"),
            "open_clip_dir": f"local-dir:{portable}",
            "params": count(model), "visual_params": count(model.visual), "steps": steps}
    (out / "export.json").write_text(json.dumps(info, indent=2))
    return info
