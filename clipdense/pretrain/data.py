"""Pretrain data: shards joined with recaptions (Ray Data, per shard, no shuffle) -> decoded square uint8 images.

Pipeline (all lazy Ray Data, CPU tasks):
  read_shards(shards)                         canonical rows (bad samples are rows with `error`)
  -> map_batches(join_recaptions)             caption/syn_captions from `<recaptions>/<shard stem>.parquet` by key;
                                              no_recaption_for_key / recaption_failed / policy needs -> row errors
  -> [count pass: errors by code]             before training, so skips are reported, never silent
  -> map_batches(decode_ok)                   drop error rows, decode + resize shorter side + centre crop -> `pixels`
The per-sample random crop, normalisation, caption choice and tokenisation happen in the train worker's batch
collate (pretrain/batches.py) because they depend on the epoch, which a Ray Data pipeline does not know.
"""
from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa

from clipdense.data.images import ImageError, decode_square
from clipdense.data.rows import error_columns, errors_from, row_error
from clipdense.errors import DataError
from clipdense.pretrain.captions import missing_for
from clipdense.pretrain.config import PretrainConfig
from clipdense.ray_session import data_context


@functools.lru_cache(maxsize=8)
def _recaption_table(path: str, s3_endpoint: str | None) -> dict | None:
    """key -> (caption, syn_captions, RowError | None) of one recaption Parquet file, this version's or an older
    one's (`error` string alone); cached per Ray worker process."""
    import pyarrow.parquet as pq

    from clipdense.data.paths import filesystem_for

    fs, inner = filesystem_for(path, s3_endpoint)
    if fs.get_file_info(inner).type.name != "File":
        return None
    table = pq.read_table(inner, filesystem=fs)
    cols = {c: table.column(c).to_pylist() if c in table.column_names else [None] * table.num_rows
            for c in ("key", "caption", "syn_captions")}
    return dict(zip(cols["key"], zip(cols["caption"], cols["syn_captions"], errors_from(table))))


def join_recaptions(batch: pa.Table, recaptions: str | None, policy: str, s3_endpoint: str | None = None) -> pa.Table:
    """Canonical rows -> the same rows with captions from the recaption files; every problem becomes a row error."""
    from clipdense.recaption.writer import output_path, shard_name

    n = batch.num_rows
    keys = batch.column("key").to_pylist()
    caps = batch.column("caption").to_pylist()
    syns = batch.column("syn_captions").to_pylist()
    errs = errors_from(batch)
    shards = batch.column("shard").to_pylist()
    for i in range(n):
        if errs[i] is not None:
            continue
        if recaptions is not None:
            table = _recaption_table(output_path(recaptions, shard_name(shards[i])), s3_endpoint)
            hit = None if table is None else table.get(keys[i])
            if table is None:
                errs[i] = row_error("no_recaption_file", output_path(recaptions, shard_name(shards[i])), shards[i])
                continue
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
                     **error_columns(errs), "shard": batch.column("shard")})


def decode_ok(batch: pa.Table, size: int, drop_keys: frozenset = frozenset(), only_keys: frozenset | None = None):
    """Keep rows without error (minus `drop_keys`, or only `only_keys`), decoded to `pixels`; undecodable rows drop."""
    keys = batch.column("key").to_pylist()
    errs = batch.column("error_code").to_pylist()
    datas = batch.column("image_bytes").to_pylist()
    caps = batch.column("caption").to_pylist()
    syns = batch.column("syn_captions").to_pylist()
    out = {"key": [], "caption": [], "syn_captions": [], "pixels": []}
    for k, e, d, c, s in zip(keys, errs, datas, caps, syns):
        if e is not None or k in drop_keys or (only_keys is not None and k not in only_keys):
            continue
        try:
            px = decode_square(d, size)
        except ImageError:  # the header looked fine, the pixels do not (validate_images=full counts it)
            continue
        out["key"].append(k)
        out["caption"].append(c)
        out["syn_captions"].append(list(s) if s is not None else [])
        out["pixels"].append(px)
    pixels = np.stack(out["pixels"]) if out["pixels"] else np.zeros((0, size, size, 3), np.uint8)
    return {"key": np.array(out["key"], dtype=object), "caption": np.array(out["caption"], dtype=object),
            "syn_captions": np.array(out["syn_captions"] + [None], dtype=object)[:-1], "pixels": pixels}


def joined_rows(shards, recaptions: str | None, policy: str, cfg: PretrainConfig):
    from clipdense.data.shards import read_shards

    rows = read_shards(shards, validate=cfg.data.validate_images, s3_endpoint=cfg.data.s3_endpoint,
                       batch_rows=cfg.data.decode_batch_size)
    return rows.map_batches(join_recaptions, batch_format="pyarrow", batch_size=cfg.data.decode_batch_size,
                            fn_kwargs={"recaptions": recaptions, "policy": policy,
                                       "s3_endpoint": cfg.data.s3_endpoint}, num_cpus=cfg.data.decode_cpus)


def count_rows(joined) -> dict:
    from clipdense.data.shards import summarize

    return summarize(joined)


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


def build_datasets(cfg: PretrainConfig, image_size: int) -> tuple[object, object | None, dict]:
    """(train dataset, eval dataset or None, counts) as lazy Ray Datasets of key/caption/syn_captions/pixels."""
    with data_context({"execution_options.preserve_order": True}):  # the same rows in the same order each epoch
        return _build_datasets(cfg, image_size)


def _build_datasets(cfg: PretrainConfig, image_size: int) -> tuple[object, object | None, dict]:
    policy = cfg.captions.policy
    joined = joined_rows(cfg.data.shards, cfg.data.recaptions, policy, cfg)
    counts = count_rows(joined) if cfg.data.count_errors else {}
    if counts and counts["ok"] == 0:
        raise DataError(f"no usable training rows in {cfg.data.shards!r} (errors: {counts['errors']})")
    decode_kw = {"batch_format": "pyarrow", "batch_size": cfg.data.decode_batch_size,
                 "num_cpus": cfg.data.decode_cpus}
    eval_ds, held = None, frozenset()
    eval_policy = "real" if cfg.eval.caption == "real" else "synthetic"
    if cfg.eval.path:
        ejoined = joined_rows(cfg.eval.path, cfg.eval.recaptions, eval_policy, cfg)
        eval_ds = ejoined.map_batches(decode_ok, fn_kwargs={"size": image_size}, **decode_kw).limit(cfg.eval.max_rows)
    elif cfg.eval.holdout:
        keys, scanned = first_ok_keys(joined, cfg.eval.holdout)
        held = frozenset(keys)
        eval_ds = joined.limit(scanned).map_batches(decode_ok, fn_kwargs={"size": image_size, "only_keys": held}, **decode_kw)
    train = joined.map_batches(decode_ok, fn_kwargs={"size": image_size, "drop_keys": held}, **decode_kw)
    if cfg.data.cache:  # decoded pixels only: the random crop runs in the worker's collate, seeded per epoch
        train = train.materialize()
    if eval_ds is not None:
        eval_ds = eval_ds.materialize()  # small; read once, iterated at every eval
        counts["eval_rows"] = eval_ds.count()
    counts["holdout_rows"] = len(held)
    return train, eval_ds, counts
