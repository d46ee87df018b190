"""Pretrain data: shards joined with recaptions (Ray Data, per shard, no shuffle) -> decoded uint8 images.

Pipeline (all lazy Ray Data, CPU tasks):
  read_shards(shards)                         canonical rows (bad samples are rows with `error`)
  -> map_batches(join_recaptions)             caption/syn_captions from `<recaptions>/<shard stem>.parquet` by key,
                                              or DataCompDR's `<shard stem>.tar` by uid (+ sha256 check, teacher
                                              embeddings, augmentation parameters);
                                              no_recaption_for_key / recaption_failed / policy needs -> row errors
  -> [count pass: errors by code]             before training, so skips are reported, never silent
  -> map_batches(decode_ok)                   drop error rows; training: the whole image, aspect kept, JPEG-draft
                                              reduced only down to what the crop needs (`decode_crop_source`) ->
                                              `pixels` (variable-shaped tensor) + `orig_w`/`orig_h`; eval: open_clip's
                                              eval geometry (shorter side + centre crop) -> size x size `pixels`
The per-sample random crop (drawn on the original geometry, as open_clip's RandomResizedCrop on the full image),
normalisation, caption choice and tokenisation happen in the train worker's batch collate (pretrain/batches.py)
because they depend on the epoch, which a Ray Data pipeline does not know. Whole images cost more object-store bytes
than 224 px squares but no resample in Ray Data: per CPU-second the cheaper split (bench/results/data_profile.md).
"""
from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa

from clipdense.config import DataError
from clipdense.data.datacompdr import json_or_none
from clipdense.data.images import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    crop_source_side,
    decode_crop_source,
    decode_square,
    open_image,
)
from clipdense.data.rows import error_columns, errors_from, row_error
from clipdense.pretrain.batches import CROP_SCALE
from clipdense.pretrain.captions import missing_for
from clipdense.pretrain.config import PretrainConfig
from clipdense.ray_session import data_context


@functools.lru_cache(maxsize=2)  # rows come shard by shard; a DataCompDR shard's embeddings are large
def _recaption_table(recaptions: str, stem: str, s3_endpoint: str | None) -> tuple[str, dict, str | None] | None:
    """One shard's recaptions, cached per Ray worker process: ("key", key -> (caption, syn_captions, RowError |
    None), None) from our `<stem>.parquet` (this version's or an older one's), or ("uid", uid -> DrSample, why it
    ended early) from a DataCompDR `<stem>.tar`; None when neither exists."""
    import pyarrow.parquet as pq

    from clipdense.data.datacompdr import read_datacompdr
    from clipdense.data.storage import Storage

    base = f"{recaptions.rstrip('/')}/{stem}"
    fs, inner = Storage(f"{base}.parquet", s3_endpoint).locate()
    if fs.get_file_info(inner).type.name == "File":
        table = pq.read_table(inner, filesystem=fs)
        cols = {c: table.column(c).to_pylist() if c in table.column_names else [None] * table.num_rows
                for c in ("key", "caption", "syn_captions")}
        return "key", dict(zip(cols["key"], zip(cols["caption"], cols["syn_captions"], errors_from(table)))), None
    fs, inner = Storage(f"{base}.tar", s3_endpoint).locate()
    if fs.get_file_info(inner).type.name == "File":
        with fs.open_input_stream(inner) as f:
            samples, broken = read_datacompdr(f)
        return "uid", samples, broken
    return None


def _uid_and_sha(meta: str | None) -> tuple[str | None, str | None]:
    """DataComp's img2dataset json carries the uid and the original image's sha256."""
    obj = json_or_none(meta)
    if not isinstance(obj, dict):
        return None, None
    uid, sha = obj.get("uid"), obj.get("sha256")
    return (str(uid) if uid is not None else None), (str(sha) if sha else None)


def join_recaptions(batch: pa.Table, recaptions: str | None, policy: str, s3_endpoint: str | None = None) -> pa.Table:
    """Canonical rows -> the same rows with captions from the recaption files (ours by key, DataCompDR's by uid,
    with its teacher embeddings and augmentation parameters); every problem becomes a row error."""
    from clipdense.data.naming import shard_name

    n = batch.num_rows
    keys = batch.column("key").to_pylist()
    caps = batch.column("caption").to_pylist()
    syns = batch.column("syn_captions").to_pylist()
    metas = batch.column("meta").to_pylist()
    augs = batch.column("aug_params").to_pylist() if "aug_params" in batch.column_names else [None] * n
    embs = batch.column("teacher_emb").to_pylist() if "teacher_emb" in batch.column_names else [None] * n
    errs = errors_from(batch)
    shards = batch.column("shard").to_pylist()
    for i in range(n):
        if errs[i] is not None:
            continue
        if recaptions is not None:
            stem = shard_name(shards[i])
            found = _recaption_table(recaptions, stem, s3_endpoint)
            if found is None:
                base = f"{recaptions.rstrip('/')}/{stem}"
                errs[i] = row_error("no_recaption_file", f"{base}.tar (DataCompDR) or {base}.parquet", shards[i])
                continue
            by, table, broken = found
            if by == "uid":
                uid, sha = _uid_and_sha(metas[i])
                hit = None if uid is None else table.get(uid)
                if hit is None:
                    why = "the image row has no uid" if uid is None else f"uid {uid}"
                    errs[i] = row_error("no_recaption_for_uid", why + (f" (shard ended: {broken})" if broken else ""),
                                        shards[i])
                    continue
                if sha and hit.sha256 and sha.lower() != hit.sha256.lower():
                    errs[i] = row_error("sha256_mismatch", f"uid {uid}: image {sha[:16]} != DataCompDR "
                                        f"{hit.sha256[:16]}", shards[i])
                    continue
                syns[i], augs[i], embs[i] = hit.syn, hit.aug_params, hit.teacher_emb
            else:
                hit = table.get(keys[i])
                if hit is None:
                    errs[i] = row_error("no_recaption_for_key", shard=shards[i])
                    continue
                cap, syn, err = hit
                if err is not None:
                    errs[i] = row_error("recaption_failed", f"{err.code}: {err.detail}", shards[i])
                    continue
                caps[i] = cap if cap is not None else caps[i]
                syns[i] = syn
        code = missing_for(policy, caps[i], syns[i])
        if code:
            errs[i] = row_error(code, shard=shards[i])
    return pa.table({"key": batch.column("key"), "image_bytes": batch.column("image_bytes"),
                     "caption": pa.array(caps, pa.string()), "syn_captions": pa.array(syns, pa.list_(pa.string())),
                     "meta": batch.column("meta"), **error_columns(errs), "shard": batch.column("shard"),
                     "aug_params": pa.array(augs, pa.string()), "teacher_emb": pa.array(embs, pa.binary())})


def _tensor_column(images: list[np.ndarray]):
    """Images of different shapes as one Ray variable-shaped tensor column (numpy batches get an object array of
    (h, w, 3) views, zero-copy); always this type, also when the shapes agree, so every block has one schema."""
    from ray.data.extensions import ArrowVariableShapedTensorArray, ArrowVariableShapedTensorType

    if not images:  # Ray builds no empty ragged array from numpy
        kind = ArrowVariableShapedTensorType(pa.uint8(), 3)
        return pa.ExtensionArray.from_storage(kind, pa.array([], kind.storage_type))
    arr = np.empty(len(images), dtype=object)
    for i, im in enumerate(images):
        arr[i] = im
    return ArrowVariableShapedTensorArray.from_numpy(arr)


def decode_ok(batch: pa.Table, size: int, drop_keys: frozenset = frozenset(), only_keys: frozenset | None = None,
              crop_source: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS, encoded: bool = False):
    """Keep rows without error (minus `drop_keys`, or only `only_keys`), decoded to `pixels`; undecodable rows drop.
    `crop_source` (training): each whole image, aspect kept, JPEG-draft reduced to no less than a crop of `size`
    needs (`decode_crop_source`), in a variable-shaped tensor column, with its original `orig_w`/`orig_h` (the
    collate draws the crop on that geometry); otherwise (eval) open_clip's eval geometry, size x size (with the
    original size too). `encoded` (data.decode_on worker | gpu, training): no decode, the header checked (pixel guard) and
    the encoded bytes shipped as `image_bytes` with `orig_w`/`orig_h` (pretrain/gpu_decode.py decodes them)."""
    if encoded:
        return _encoded_ok(batch, drop_keys, max_pixels)
    keys = batch.column("key").to_pylist()
    errs = batch.column("error_code").to_pylist()
    datas = batch.column("image_bytes").to_pylist()
    caps = batch.column("caption").to_pylist()
    syns = batch.column("syn_captions").to_pylist()
    n = batch.num_rows
    augs = batch.column("aug_params").to_pylist() if "aug_params" in batch.column_names else [None] * n
    embs = batch.column("teacher_emb").to_pylist() if "teacher_emb" in batch.column_names else [None] * n
    min_side = crop_source_side(size, CROP_SCALE[0])
    out = {"key": [], "caption": [], "syn_captions": [], "pixels": [], "aug_params": [], "teacher_emb": [],
           "orig_w": [], "orig_h": []}
    for k, e, d, c, s, a, t in zip(keys, errs, datas, caps, syns, augs, embs):
        if e is not None or k in drop_keys or (only_keys is not None and k not in only_keys):
            continue
        try:
            if crop_source:
                px, (w, h) = decode_crop_source(d, min_side, max_pixels)
            else:
                w, h = open_image(d, max_pixels).size  # a header parse: eval rows are few
                px = decode_square(d, size, max_pixels)
        except ImageError:  # the header looked fine, the pixels do not (validate_images=full counts it)
            continue
        out["key"].append(k)
        out["caption"].append(c)
        out["syn_captions"].append(list(s) if s is not None else [])
        out["pixels"].append(px)
        out["aug_params"].append(a)
        out["teacher_emb"].append(t)
        out["orig_w"].append(w)
        out["orig_h"].append(h)
    from ray.data.extensions import ArrowTensorArray

    if crop_source:
        pixels = _tensor_column(out["pixels"])
    else:
        pixels = ArrowTensorArray.from_numpy(np.stack(out["pixels"]) if out["pixels"] else
                                             np.zeros((0, size, size, 3), np.uint8))
    # typed columns: a numpy batch would turn an all-null column (no DataCompDR fields) into float NaNs
    return pa.table({"key": pa.array(out["key"], pa.string()), "caption": pa.array(out["caption"], pa.string()),
                     "syn_captions": pa.array(out["syn_captions"], pa.list_(pa.string())),
                     "pixels": pixels, "orig_w": pa.array(out["orig_w"], pa.int32()),
                     "orig_h": pa.array(out["orig_h"], pa.int32()),
                     "aug_params": pa.array(out["aug_params"], pa.string()),
                     "teacher_emb": pa.array(out["teacher_emb"], pa.binary())})


def _encoded_ok(batch: pa.Table, drop_keys: frozenset, max_pixels: int) -> pa.Table:
    """Rows without error (minus `drop_keys`) whose header passes the pixel guard, still encoded, with their size."""
    keep, sizes = [], []
    for i, (k, e, d) in enumerate(zip(batch.column("key").to_pylist(), batch.column("error_code").to_pylist(),
                                      batch.column("image_bytes").to_pylist())):
        if e is not None or k in drop_keys:
            continue
        try:
            sizes.append(open_image(d, max_pixels).size)
        except ImageError:
            continue
        keep.append(i)
    rows = batch.take(pa.array(keep, pa.int64()))
    cols = ["key", "caption", "syn_captions", "image_bytes", "aug_params", "teacher_emb"]
    return pa.table({**{c: rows.column(c) for c in cols if c in rows.column_names},
                     "orig_w": pa.array([w for w, _ in sizes], pa.int32()),
                     "orig_h": pa.array([h for _, h in sizes], pa.int32())})


def joined_rows(shards, recaptions: str | None, policy: str, cfg: PretrainConfig):
    """(canonical rows joined with their recaptions, the batch size of the maps that follow: None or
    `data.decode_batch_size`). Read tasks of ~READ_TASK_BYTES, their blocks (`decode_batch_size` rows) not split.
    With two shards per cluster CPU every CPU has read tasks of its own: the maps take whole blocks (no batch size),
    so Ray fuses the join and the decode into the read tasks and the encoded images never cross the object store;
    with fewer shards the maps stay apart and take blocks as the reads stream them, on every CPU."""
    from clipdense.data.paths import expand_shards
    from clipdense.data.shards import READ_TASK_BYTES, cluster_cpus, read_shards
    from clipdense.data.storage import Storage

    specs = [shards] if isinstance(shards, str) else shards
    listed = expand_shards([Storage(s, cfg.data.s3_endpoint) for s in specs])
    tars = sum(f.endswith(".tar") for f in listed.files)
    batch = None if tars >= 2 * cluster_cpus() else cfg.data.decode_batch_size
    rows = read_shards(listed, validate=cfg.data.validate_images, batch_rows=cfg.data.decode_batch_size,
                       task_bytes=READ_TASK_BYTES)
    return rows.map_batches(join_recaptions, batch_format="pyarrow", batch_size=batch,
                            fn_kwargs={"recaptions": recaptions, "policy": policy,
                                       "s3_endpoint": cfg.data.s3_endpoint}, num_cpus=cfg.data.decode_cpus), batch


JOIN_MISSED = ("no_recaption_file", "no_recaption_for_key", "no_recaption_for_uid")


def count_rows(joined) -> dict:
    """Rows, usable rows, errors by code, and the synthetic captions: usable rows carrying them, their mean number
    per such row, the rows the recaption join missed (no file, key or uid) and those carrying teacher embeddings."""
    import pyarrow.compute as pc

    from clipdense.data.rows import count_codes

    rows, ok, errors, with_syn, n_syn, with_teacher = 0, 0, {}, 0, 0, 0
    for batch in joined.select_columns(["error_code", "syn_captions", "teacher_emb"]).iter_batches(
            batch_format="pyarrow", batch_size=4096):
        n_ok, counts = count_codes(batch.column("error_code").to_pylist())
        rows, ok = rows + batch.num_rows, ok + n_ok
        for code, k in counts.items():
            errors[code] = errors.get(code, 0) + k
        usable = batch.filter(pc.is_null(batch.column("error_code")))
        lengths = pc.fill_null(pc.list_value_length(usable.column("syn_captions")), 0)
        with_syn += int(pc.sum(pc.greater(lengths, 0)).as_py() or 0)
        n_syn += int(pc.sum(lengths).as_py() or 0)
        with_teacher += int(pc.sum(pc.is_valid(usable.column("teacher_emb"))).as_py() or 0)
    return {"rows": rows, "ok": ok, "errors": dict(sorted(errors.items())),
            "synthetic": {"rows_with": with_syn, "per_row_mean": round(n_syn / with_syn, 3) if with_syn else 0.0,
                          "join_missed": sum(errors.get(c, 0) for c in JOIN_MISSED),
                          "rows_with_teacher_emb": with_teacher}}


def first_ok_keys(joined, n: int) -> tuple[list[str], int]:
    """The keys of the first `n` usable rows (in input order: the held-out split) and the rows scanned to find them."""
    keys: list[str] = []
    seen = 0
    for batch in joined.select_columns(["key", "error_code"]).iter_batches(batch_format="pyarrow", batch_size=256):
        for k, e in zip(batch.column("key").to_pylist(), batch.column("error_code").to_pylist()):
            seen += 1
            if e is None:
                keys.append(k)
                if len(keys) >= n:
                    return keys, seen
    return keys, seen


def check_teacher_rows(cfg: PretrainConfig, counts: dict) -> None:
    """loss.distill needs DataCompDR teacher embeddings: none in any usable row is a one-line error; rows without
    them train only the contrastive term (masked out of distillation), their number is in the counts."""
    if cfg.loss.distill.enabled and counts and counts["synthetic"]["rows_with_teacher_emb"] == 0:
        raise DataError(f"loss.distill is on but no usable row of {cfg.data.shards!r} carries DataCompDR teacher "
                        f"embeddings (data.recaptions must name DataCompDR .tar shards with npz members)")


def build_datasets(cfg: PretrainConfig, image_size: int) -> tuple[object, object | None, dict]:
    """(train dataset, eval dataset or None, counts) as lazy Ray Datasets of key/caption/syn_captions/pixels/orig_w/
    orig_h (+ DataCompDR's aug_params/teacher_emb)."""
    # the same rows in the same order each epoch; Ray Data's progress bars off unless asked for (they would drown
    # the run's own progress, and refreshing them costs the executor CPU per block)
    with data_context({"execution_options.preserve_order": True,
                       "enable_progress_bars": cfg.tracking.ray_data_progress}):
        return _build_datasets(cfg, image_size)


def _build_datasets(cfg: PretrainConfig, image_size: int) -> tuple[object, object | None, dict]:
    policy = cfg.captions.policy
    joined, batch = joined_rows(cfg.data.shards, cfg.data.recaptions, policy, cfg)
    counts = count_rows(joined) if cfg.data.count_errors else {}
    if counts and counts["ok"] == 0:
        raise DataError(f"no usable training rows in {cfg.data.shards!r} (errors: {counts['errors']})")
    check_teacher_rows(cfg, counts)
    decode_kw = {"batch_format": "pyarrow", "num_cpus": cfg.data.decode_cpus}
    eval_ds, held = None, frozenset()
    eval_policy = "real" if cfg.eval.caption == "real" else "synthetic"
    if cfg.eval.path:
        ejoined, ebatch = joined_rows(cfg.eval.path, cfg.eval.recaptions, eval_policy, cfg)
        eval_ds = ejoined.map_batches(decode_ok, fn_kwargs={"size": image_size}, batch_size=ebatch,
                                      **decode_kw).limit(cfg.eval.max_rows)
    elif cfg.eval.holdout:
        keys, scanned = first_ok_keys(joined, cfg.eval.holdout)
        held = frozenset(keys)
        eval_ds = joined.limit(scanned).map_batches(decode_ok, fn_kwargs={"size": image_size, "only_keys": held},
                                                    batch_size=cfg.data.decode_batch_size, **decode_kw)
    train = joined.map_batches(decode_ok, fn_kwargs={"size": image_size, "drop_keys": held, "crop_source": True,
                                                     "encoded": cfg.data.decode_on != "cpu"}, batch_size=batch,
                               **decode_kw)
    if cfg.data.cache:  # decoded whole images only: the random crop runs in the worker's collate, seeded per epoch
        train = train.materialize()
    if eval_ds is not None:
        eval_ds = eval_ds.materialize()  # small; read once, iterated at every eval
        counts["eval_rows"] = eval_ds.count()
    counts["holdout_rows"] = len(held)
    return train, eval_ds, counts
