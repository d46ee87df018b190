"""Batch collation in the train worker (Ray Data `iter_torch_batches(collate_fn=...)`, on its prefetch threads).

Train: open_clip's train transform, RandomResizedCrop(scale=(0.9, 1.0), ratio=(3/4, 4/3)) on the FULL image,
bicubic: each row arrives whole, aspect kept (pretrain/data.py; JPEG-draft reduced at most to what the crop needs)
with its original size (`orig_w`, `orig_h`); the box is drawn on that original geometry exactly as torchvision's
`RandomResizedCrop.get_params` would (`crop_box`, with the generator `sample_rng(seed, epoch, key)`: it varies by
epoch yet replays exactly on resume), mapped to the decoded copy (`source_box`), and resized with torch's uint8
antialiased bicubic (PIL's filter; within 1 level of torchvision on a PIL image, several times cheaper than PIL's
resize), then the model's mean/std folded with the 1/255 into one in-place pass. The caption policy picks each
sample's text(s), tokenised here. Eval rows come at open_clip's eval geometry (shorter side + centre crop): no crop.
"""
from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from clipdense.pretrain.captions import pick_batch, real_mask, sample_rng
from clipdense.pretrain.distill import stored_views

try:  # Ray Data's typed collate (a bare callable is deprecated since Ray 2.47)
    from ray.data.collate_fn import NumpyBatchCollateFn as _CollateBase
except ImportError:  # Collate also runs without Ray (bench.gpu on a GPU box, plain loops)
    _CollateBase = object

CROP_SCALE = (0.9, 1.0)     # open_clip image_transform(is_train=True) default
CROP_RATIO = (3 / 4, 4 / 3)


def crop_box(rng: np.random.Generator, h: int, w: int, scale=CROP_SCALE, ratio=CROP_RATIO) -> tuple[float, ...]:
    """torchvision RandomResizedCrop.get_params with an explicit generator: (x1, y1, x2, y2) in pixels."""
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            return (x, y, x + cw, y + ch)
    in_ratio = w / h  # fallback: centre crop clamped to the ratio range
    cw, ch = (w, int(round(w / ratio[0]))) if in_ratio < ratio[0] else \
        (int(round(h * ratio[1])), h) if in_ratio > ratio[1] else (w, h)
    x, y = (w - cw) // 2, (h - ch) // 2
    return (x, y, x + cw, y + ch)


def source_box(box: tuple, orig_w: int, orig_h: int, w: int, h: int) -> tuple[int, int, int, int]:
    """A box drawn on the original (orig_w x orig_h) image -> integer pixels of its decoded (w x h) copy (the same
    box when nothing was reduced; else scaled and rounded, at least one pixel, inside the image)."""
    if (w, h) == (orig_w, orig_h):
        return tuple(int(v) for v in box)
    sx, sy = w / orig_w, h / orig_h
    x1, y1 = min(w - 1, max(0, round(box[0] * sx))), min(h - 1, max(0, round(box[1] * sy)))
    return x1, y1, max(x1 + 1, min(w, round(box[2] * sx))), max(y1 + 1, min(h, round(box[3] * sy)))


def _chw(image: np.ndarray) -> torch.Tensor:
    """(h, w, 3) uint8 numpy -> a (1, 3, h, w) channels-last torch view (Ray hands read-only arrays: only read)."""
    return torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0)


def _resize(view: torch.Tensor, box: tuple, size: int) -> torch.Tensor:
    """(1, 3, h, w) uint8 view, integer pixel box -> (1, 3, size, size) uint8: torch's uint8 antialiased bicubic
    kernel (PIL's filter), called directly: per sample, F.interpolate's argument checks cost more than the kernel
    on small images."""
    x1, y1, x2, y2 = box
    crop = view[:, :, y1:y2, x1:x2].contiguous(memory_format=torch.channels_last)  # its fast path wants it dense
    return torch._C._nn._upsample_bicubic2d_aa(crop, (size, size), False, None, None)


def resized_crop(image: np.ndarray, box: tuple, size: int) -> torch.Tensor:
    """(h, w, 3) uint8 -> the integer pixel box resized to (3, size, size) uint8: bicubic with antialias, PIL's
    filter (torch's uint8 kernel for antialias=True; within 1 of torchvision's resized_crop on a PIL image)."""
    with warnings.catch_warnings():  # a read-only array is only read here (the crop is copied)
        warnings.simplefilter("ignore", UserWarning)
        return _resize(_chw(image), box, size)[0]


def reference_crop(image: np.ndarray, orig_w: int, orig_h: int, rng: np.random.Generator, size: int) -> torch.Tensor:
    """open_clip's train crop of one decoded (h, w, 3) uint8 image whose original was orig_w x orig_h: the box
    drawn on the original geometry, mapped to the decoded copy, resized -> (3, size, size) uint8."""
    h, w = image.shape[:2]
    return resized_crop(image, source_box(crop_box(rng, orig_h, orig_w), orig_w, orig_h, w, h), size)


def random_resized_crops(images, boxes: list[tuple], size: int) -> torch.Tensor:
    """Each (h, w, 3) uint8 image cropped to its integer pixel box and resized to size x size -> (B, 3, S, S) uint8."""
    out = torch.empty((len(boxes), 3, size, size), dtype=torch.uint8)
    with warnings.catch_warnings():  # once per batch: per sample it costs as much as a small crop
        warnings.simplefilter("ignore", UserWarning)
        for i, box in enumerate(boxes):
            out[i] = _resize(_chw(images[i]), box, size)[0]
    return out


def reference_boxes(ims: list[np.ndarray], origs, keys: list[str], seed: int, epoch: int) -> list[tuple]:
    """Each sample's RandomResizedCrop box, drawn on its original (w, h) and mapped to its decoded copy."""
    return [source_box(crop_box(sample_rng(seed, epoch, k, 2), int(oh), int(ow)), int(ow), int(oh),
                       im.shape[1], im.shape[0]) for im, k, (ow, oh) in zip(ims, keys, origs)]


def undecodable_row(key: str, error, decode_on: str):
    """The one-line DataError for a row whose header passed Ray Data's check but whose pixels do not decode in the
    train worker (data.decode_on worker | gpu): dropping it there would leave this worker's batch smaller than the
    others' (the contrastive loss gathers equal batches)."""
    from clipdense.config import DataError

    return DataError(f"{key}: {error.code}: {error.detail} (data.decode_on {decode_on} decodes in the train worker; "
                     f"data.validate_images=full records such rows as errors before training)")


def decode_sources(datas, keys: list[str], size: int) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
    """data.decode_on worker: encoded rows (their headers passed Ray Data's pixel guard) -> the decoded images and
    their original (w, h), exactly as Ray Data's decode_ok(crop_source=True) makes them. Undecodable pixels are a
    one-line DataError naming the key (`undecodable_row`)."""
    from clipdense.data.images import ImageError, crop_source_side, decode_crop_source

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
    from clipdense.models import tokenizer_for

    return tokenizer_for(name)


class Collate(_CollateBase):
    """numpy batch (key, caption, syn_captions, pixels[, orig_w, orig_h, aug_params, teacher_emb]) -> {"image":
    (B,3,S,S), "texts": [(B,L) per caption slot], "keys"}; `both` adds "real_mask" (B,) (rows with a real caption);
    DataCompDR rows add "teacher_image_emb" (B,A,D), "teacher_text_emb" (B,T,D), "teacher_mask" (B,) and
    "aug_params" (JSON strings). With `distill_slots` (loss.distill) each DataCompDR row gets one of its stored views
    as its image, and "distill_image_emb" (B,D), "distill_text_emb" (B,n,D), "distill_mask" (B,n), "distill_views"
    (B,) in place of the two teacher arrays (pretrain/distill.py)."""

    def __init__(self, *, model_name: str, image_size: int, mean, std, policy: str, seed: int, epoch: int,
                 mix_p: float = 0.5, train: bool = True, distill_slots: tuple = (), decode_on: str = "cpu",
                 decode_device=None):
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

    def __call__(self, batch: dict) -> dict:
        keys = [str(k) for k in batch["key"]]
        # loss.distill on DataCompDR: each sample's stored view (pretrain/distill.py), as its teachers embedded it
        views = stored_views(batch, keys, self.seed, self.epoch, self.size) \
            if self.train and self.distill_slots else None
        if views is not None:
            image, view_index = views
        elif self.train and "image_bytes" in batch and self.decode_on == "worker":  # as Ray Data would, here
            ims, origs = decode_sources(batch["image_bytes"], keys, self.size)
            image = random_resized_crops(ims, reference_boxes(ims, origs, keys, self.seed, self.epoch),
                                         self.size).float()
        elif self.train and "image_bytes" in batch:  # data.decode_on gpu: the same boxes, decoded on the device
            from clipdense.pretrain.gpu_decode import decode_crops

            origs = [(int(w), int(h)) for w, h in zip(batch["orig_w"], batch["orig_h"])]
            boxes = [crop_box(sample_rng(self.seed, self.epoch, k, 2), oh, ow) for k, (ow, oh) in zip(keys, origs)]
            image, n_cpu = decode_crops(list(batch["image_bytes"]), origs, boxes, self.size,
                                        self.decode_device or "cpu", keys=keys)
            self.decode_fallbacks += n_cpu
        elif self.train:  # boxes drawn on the original geometry, as RandomResizedCrop on the full image would
            ims, sizes = _images(batch["pixels"])
            origs = list(zip(batch["orig_w"], batch["orig_h"])) if "orig_w" in batch else sizes
            image = random_resized_crops(ims, reference_boxes(ims, origs, keys, self.seed, self.epoch),
                                         self.size).float()
        else:  # eval rows come at open_clip's eval geometry already (shorter side + centre crop)
            ims, _ = _images(batch["pixels"])
            px = torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2)  # a copy: writable
            image = px.float() if px.shape[-1] == self.size else \
                F.interpolate(px.float(), size=(self.size, self.size), mode="bicubic", antialias=True)
        image = image.mul_(self.scale.to(image.device)).add_(self.shift.to(image.device))  # there, if on a GPU
        reals = [None if c is None else str(c) for c in batch["caption"]]
        syns = [list(s) if s is not None else [] for s in batch["syn_captions"]]
        if self.train:
            slots = pick_batch(self.policy, keys, reals, syns, self.seed, self.epoch, self.mix_p)
        else:  # eval: the real caption, or the first synthetic one (also when the real one is missing)
            use_syn = self.policy == "synthetic"
            slots = [[(s[0] if s else r) if (use_syn or not r) else r for r, s in zip(reals, syns)]]
        tok = _tokenizer(self.model_name)
        out = {"image": image, "texts": [tok(texts) for texts in slots], "keys": keys}
        if self.decode_device is not None:  # rows decoded on the CPU so far (not JPEG, or refused by nvJPEG)
            out["decode_fallbacks"] = torch.tensor(self.decode_fallbacks)
        if self.train and self.policy == "both":
            out["real_mask"] = torch.tensor(real_mask(reals), dtype=torch.bool)
        embs = batch.get("teacher_emb")
        if embs is not None and any(e is not None for e in embs):  # DataCompDR rows: for distillation losses
            from clipdense.data.datacompdr import teacher_batch

            out.update(teacher_batch(embs, keys))
            out["aug_params"] = [None if a is None else str(a) for a in batch["aug_params"]]
        if self.train and self.distill_slots and "teacher_mask" in out:
            from clipdense.pretrain.distill import distill_targets

            out.update(distill_targets(out, keys, reals, syns, slots, self.distill_slots,
                                       view_index if views is not None else None))
        return out
