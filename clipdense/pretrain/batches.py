"""Batch collation in the train worker (Ray Data `iter_torch_batches(collate_fn=...)`, on its prefetch threads).

Train: open_clip's train transform, RandomResizedCrop on the FULL image, bicubic (pretrain/crops.py): each row
arrives whole, aspect kept (pretrain/data.py; JPEG-draft reduced at most to what the crop needs) with its original
size (`orig_w`, `orig_h`); its box is drawn on that original geometry, mapped to the decoded copy and resized, then
the model's mean/std folded with the 1/255 into one in-place pass. The caption policy picks each
sample's text(s), tokenised here. Eval rows come at open_clip's eval geometry (shorter side + centre crop): no crop.
"""
from __future__ import annotations

import copy
import functools

import numpy as np
import torch
import torch.nn.functional as F

from clipdense.data.datacompdr import teacher_batch
from clipdense.data.images import ImageError, crop_source_side, decode_crop_source
from clipdense.models import tokenizer_for
from clipdense.pretrain.captions import pick_batch, real_mask
from clipdense.pretrain.crops import CROP_SCALE, random_resized_crops, reference_boxes, sample_box, undecodable_row
from clipdense.pretrain.distill import distill_targets, stored_views
from clipdense.pretrain.gpu_decode import decode_crops


def decode_sources(datas, keys: list[str], size: int) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
    """data.decode_on worker: encoded rows (their headers passed Ray Data's pixel guard) -> the decoded images and
    their original (w, h), exactly as Ray Data's decode_ok(crop_source=True) makes them. Undecodable pixels are a
    one-line DataError naming the key (`undecodable_row`)."""
    ims, origs = [], []
    min_side = crop_source_side(size, CROP_SCALE[0])
    for data, key in zip(datas, keys):
        try:
            px, orig = decode_crop_source(data, min_side)
        except ImageError as e:
            raise undecodable_row(key, e, "worker") from None
        ims.append(px)
        origs.append(orig)
    return ims, origs


def _images(pixels) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
    """A batch's `pixels`: (B, H, W, 3) or an object array of (h, w, 3) -> uint8 arrays and their (w, h)."""
    ims = [np.asarray(p, dtype=np.uint8) for p in pixels]
    return ims, [(im.shape[1], im.shape[0]) for im in ims]


@functools.lru_cache(maxsize=4)
def _tokenizer(name: str):
    return tokenizer_for(name)


class Collate:
    """numpy batch (key, caption, syn_captions, pixels[, orig_w, orig_h, aug_params, teacher_emb]) -> {"image":
    (B,3,S,S), "texts": [(B,L) per caption slot], "keys"}; `both` adds "real_mask" (B,) (rows with a real caption);
    DataCompDR rows add "teacher_image_emb" (B,A,D), "teacher_text_emb" (B,T,D), "teacher_mask" (B,) and
    "aug_params" (JSON strings). With `distill_slots` (loss.distill) each DataCompDR row gets one of its stored views
    as its image, and "distill_image_emb" (B,D), "distill_text_emb" (B,n,D), "distill_mask" (B,n), "distill_views"
    (B,) in place of the two teacher arrays (pretrain/distill.py). A plain callable: pretrain/data.py hands it to
    Ray Data as its typed collate."""

    def __init__(self, *, model_name: str, image_size: int, mean, std, policy: str, seed: int, epoch: int,
                 mix_p: float = 0.5, min_score: float | None = None, train: bool = True,
                 distill_slots: tuple = (), decode_on: str = "cpu", decode_device=None):
        self.model_name, self.size, self.policy = model_name, image_size, policy
        # data.decode_on worker | gpu: train rows come encoded (`image_bytes`), decoded + cropped here, on this
        # process's CPU (PIL, as Ray Data would) or on the GPU (pretrain/gpu_decode.py)
        self.decode_on = "gpu" if decode_device is not None else decode_on
        self.decode_device, self.decode_fallbacks = decode_device, 0
        self.distill_slots = tuple(distill_slots)  # ((caption slot, "real" | "synthetic"), ...): loss.distill on
        mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.scale, self.shift = 1.0 / (255.0 * std), -mean / std  # (x / 255 - mean) / std = x * scale + shift
        self.seed, self.epoch, self.mix_p, self.train = seed, epoch, mix_p, train
        # captions.min_score: synthetic captions below it are never drawn (not under `real`: it takes none)
        self.min_score = min_score if policy != "real" else None

    def for_epoch(self, epoch: int) -> "Collate":
        """The same collate for another epoch (its crops and caption draws are seeded by the epoch)."""
        other = copy.copy(self)
        other.epoch = epoch
        return other

    def prepare(self) -> None:
        """Load the tokenizer now (before a loader forks its workers, which then share it)."""
        _tokenizer(self.model_name)

    def __call__(self, batch: dict) -> dict:
        keys = [str(k) for k in batch["key"]]
        image, view_index = self._train_images(batch, keys) if self.train else (self._eval_images(batch), None)
        image = image.mul_(self.scale.to(image.device)).add_(self.shift.to(image.device))  # there, if on a GPU
        reals = [None if c is None else str(c) for c in batch["caption"]]
        syns = [list(s) if s is not None else [] for s in batch["syn_captions"]]
        slots = self._captions(keys, reals, syns, batch.get("syn_scores"))
        tok = _tokenizer(self.model_name)
        out = {"image": image, "texts": [tok(texts) for texts in slots], "keys": keys}
        if self.decode_device is not None:  # rows decoded on the CPU so far (not JPEG, or refused by nvJPEG)
            out["decode_fallbacks"] = torch.tensor(self.decode_fallbacks)
        if self.train and self.policy == "both":
            out["real_mask"] = torch.tensor(real_mask(reals), dtype=torch.bool)
        embs = batch.get("teacher_emb")
        if embs is not None and any(e is not None for e in embs):  # DataCompDR rows: for distillation losses
            out.update(teacher_batch(embs, keys))
            out["aug_params"] = [None if a is None else str(a) for a in batch["aug_params"]]
        if self.train and self.distill_slots and "teacher_mask" in out:
            out.update(distill_targets(out, keys, reals, syns, slots, self.distill_slots, view_index))
        return out

    def _train_images(self, batch: dict, keys: list[str]) -> tuple[torch.Tensor, list[int] | None]:
        """((B, 3, S, S) float in 0..255, each row's stored view index or None): boxes drawn on the original
        geometry, as RandomResizedCrop on the full image would."""
        # loss.distill on DataCompDR: each sample's stored view (pretrain/distill.py), as its teachers embedded it
        views = stored_views(batch, keys, self.seed, self.epoch, self.size) if self.distill_slots else None
        if views is not None:
            return views
        if "image_bytes" in batch and self.decode_on == "worker":  # as Ray Data would, here
            ims, origs = decode_sources(batch["image_bytes"], keys, self.size)
        elif "image_bytes" in batch:  # data.decode_on gpu: the same boxes, decoded on the device
            return self._device_crops(batch, keys), None
        else:
            ims, sizes = _images(batch["pixels"])
            origs = list(zip(batch["orig_w"], batch["orig_h"])) if "orig_w" in batch else sizes
        return random_resized_crops(ims, reference_boxes(ims, origs, keys, self.seed, self.epoch),
                                    self.size).float(), None

    def _device_crops(self, batch: dict, keys: list[str]) -> torch.Tensor:
        origs = [(int(w), int(h)) for w, h in zip(batch["orig_w"], batch["orig_h"])]
        boxes = [sample_box(self.seed, self.epoch, k, ow, oh) for k, (ow, oh) in zip(keys, origs)]
        image, n_cpu = decode_crops(list(batch["image_bytes"]), origs, boxes, self.size, self.decode_device or "cpu",
                                    keys=keys)
        self.decode_fallbacks += n_cpu
        return image

    def _eval_images(self, batch: dict) -> torch.Tensor:
        """Eval rows come at open_clip's eval geometry already (shorter side + centre crop)."""
        ims, _ = _images(batch["pixels"])
        px = torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2)  # a copy: writable
        return px.float() if px.shape[-1] == self.size else \
            F.interpolate(px.float(), size=(self.size, self.size), mode="bicubic", antialias=True)

    def _captions(self, keys: list[str], reals: list, syns: list, scores) -> list[list[str]]:
        if self.train:  # the whole `syns` stay in the batch: distill_targets finds a picked caption's stored index
            scores = None if scores is None or self.min_score is None else \
                [None if s is None else [float(x) for x in s] for s in scores]
            return pick_batch(self.policy, keys, reals, syns, self.seed, self.epoch, self.mix_p, scores,
                              self.min_score)
        # eval: the real caption, or the first synthetic one (also when the real one is missing)
        use_syn = self.policy == "synthetic"
        return [[(s[0] if s else r) if (use_syn or not r) else r for r, s in zip(reals, syns)]]
