"""DataCompDR (apple/DataCompDR-12M, -1B) shards as recaptions, joined by uid to DataComp's image shards.

A DataCompDR shard holds no images: per sample `url.txt`, `syn.json` = {"syn_text": [captions]}, `paug.json` =
{"param_aug": "<json string>"}, `npz` (teacher embeddings: `image_emb` per stored augmentation, `text_emb` for the
real + synthetic captions) and `json` = {"uid", "sha256"}. Images and real captions come from the DataComp shard of
the same name; the join key is the uid (DataComp's img2dataset json carries it), and where the image row records
the original image's sha256 it must equal DataCompDR's: the stored augmentations and embeddings hold only for the
identical image.
"""
from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass

import numpy as np

from clipdense.config import DataError


@dataclass(frozen=True)
class DrSample:
    syn: list[str] | None       # the synthetic captions
    sha256: str | None          # of the original image
    aug_params: str | None      # DataCompDR's param_aug, the JSON string as stored
    teacher_emb: bytes | None   # the npz as stored (image_emb, text_emb)
    syn_score: list[float] | None = None  # clipdense's extension of syn.json: each synthetic caption's CLIP score


def json_or_none(data: str | bytes | None):
    """Parsed JSON, or None for a missing or unreadable member (bad UTF-8/JSON, or nesting deep enough to hit
    Python's recursion limit: a corrupt shard must not crash the reader)."""
    if data is None:
        return None
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


def syn_captions_from_json(data: bytes | None) -> list[str] | None:
    """`syn.json`: a list of captions, or DataCompDR's {"syn_text": [...]}; anything else is no captions."""
    obj = json_or_none(data)
    if isinstance(obj, dict):
        obj = obj.get("syn_text")
    if isinstance(obj, list) and all(isinstance(s, str) for s in obj):
        return obj
    return None


def syn_scores_from_json(data: bytes | None) -> list[float] | None:
    """`syn.json`'s `syn_score` (written by clipdense's recaption with teachers), when it is a list of numbers."""
    obj = json_or_none(data)
    scores = obj.get("syn_score") if isinstance(obj, dict) else None
    if isinstance(scores, list) and all(isinstance(x, (int, float)) for x in scores):
        return [float(x) for x in scores]
    return None


def aug_params_from_json(data: bytes | None) -> str | None:
    """`paug.json` = {"param_aug": "<json string>"} -> that string (kept as stored: the consumer parses it)."""
    obj = json_or_none(data)
    value = obj.get("param_aug") if isinstance(obj, dict) else None
    return value if isinstance(value, str) else (json.dumps(value) if value is not None else None)


def _sample(files: dict[str, bytes]) -> tuple[str | None, DrSample]:
    meta = json_or_none(files.get("json"))
    meta = meta if isinstance(meta, dict) else {}
    uid = meta.get("uid")
    return (str(uid) if uid is not None else None,
            DrSample(syn_captions_from_json(files.get("syn.json")), meta.get("sha256"),
                     aug_params_from_json(files.get("paug.json")), files.get("npz"),
                     syn_scores_from_json(files.get("syn.json"))))


def read_datacompdr(stream) -> tuple[dict[str, DrSample], str | None]:
    """uid -> DrSample of one DataCompDR shard, and why it ended early (None when complete): a broken tar keeps
    the samples read so far; the image rows it lacks become `no_recaption_for_uid` rows."""
    out: dict[str, DrSample] = {}
    key, files = None, {}

    def flush():
        if key is not None:
            uid, sample = _sample(files)
            if uid is not None:
                out[uid] = sample

    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base, dot, ext = member.name.rsplit("/", 1)[-1].partition(".")
                if not dot:
                    continue
                if base != key:
                    flush()
                    key, files = base, {}
                files[ext.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        return out, type(e).__name__
    flush()
    return out, None


TEACHER_ARRAYS = ("image_emb", "text_emb")


def teacher_batch(blobs, keys) -> dict:
    """DataCompDR npz per row -> {"teacher_image_emb": (B, A, D), "teacher_text_emb": (B, T, D) float32,
    "teacher_mask": (B,) bool}; a row without embeddings is zeros with its mask false."""
    import torch  # local: the readers of this module run where torch may be absent (the vllm actors' venv)

    loaded = []
    for blob, key in zip(blobs, keys):
        if blob is None:
            loaded.append(None)
            continue
        with np.load(io.BytesIO(bytes(blob))) as z:
            missing = [a for a in TEACHER_ARRAYS if a not in z.files]
            if missing:
                raise DataError(f"DataCompDR npz of {key!r} lacks {', '.join(missing)} (has: {', '.join(z.files)})")
            loaded.append({a: np.asarray(z[a], np.float32) for a in TEACHER_ARRAYS})
    first = next(x for x in loaded if x is not None)
    out = {}
    for a in TEACHER_ARRAYS:
        shape = first[a].shape
        for x, key in zip(loaded, keys):
            if x is not None and x[a].shape != shape:
                raise DataError(f"DataCompDR {a} of {key!r} has shape {x[a].shape}, the batch's others {shape}")
        out[f"teacher_{a}"] = torch.from_numpy(np.stack([x[a] if x is not None else np.zeros(shape, np.float32)
                                                         for x in loaded]))
    out["teacher_mask"] = torch.tensor([x is not None for x in loaded], dtype=torch.bool)
    return out
