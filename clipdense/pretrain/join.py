"""Shard rows joined with their recaptions: a pure function of a pyarrow batch, run as a Ray Data map (data.py).

Each shard's captions come from `<recaptions>/<shard stem>.parquet` (the recaption stage's output: by key, this
version's or an older one's) or DataCompDR's `<shard stem>.tar` (by uid, with the sha256 checked, its teacher
embeddings and augmentation parameters). Every problem becomes a row error: no_recaption_file,
no_recaption_for_key / _uid, recaption_failed, sha256_mismatch, and what the caption policy needs (`missing_for`,
with `captions.min_score`: below_min_score). Each synthetic caption's CLIP score comes along (`syn_scores`: the
Parquet's column, syn.json's `syn_score`); with `captions.min_score` set, a row without them is a one-line DataError
naming the file: filtering cannot be done on captions nobody scored.
"""
from __future__ import annotations

import functools

import pyarrow as pa
import pyarrow.parquet as pq

from clipdense.config import DataError
from clipdense.data.datacompdr import json_or_none, read_datacompdr
from clipdense.data.naming import shard_name
from clipdense.data.rows import RowError, error_columns, errors_from, row_error
from clipdense.data.storage import Storage
from clipdense.pretrain.captions import kept_synthetic, missing_for

JOIN_MISSED = ("no_recaption_file", "no_recaption_for_key", "no_recaption_for_uid")


@functools.lru_cache(maxsize=2)  # rows come shard by shard; a DataCompDR shard's embeddings are large
def _recaption_table(recaptions: Storage, stem: str) -> tuple[str, dict, str | None] | None:
    """One shard's recaptions, cached per Ray worker process: ("key", key -> (caption, syn_captions, syn_scores,
    RowError | None), None, uid -> DrSample of a DataCompDR tar beside it (recaption with teachers) or {}) from our
    `<stem>.parquet` (this version's or an older one's), or ("uid", uid -> DrSample, why it ended early) from a
    DataCompDR `<stem>.tar`; None when neither exists."""
    ours, theirs = recaptions.child(f"{stem}.parquet"), recaptions.child(f"{stem}.tar")
    if ours.is_file():
        table = pq.read_table(ours.path, filesystem=ours.fs)
        cols = {c: table.column(c).to_pylist() if c in table.column_names else [None] * table.num_rows
                for c in ("key", "caption", "syn_captions", "syn_scores")}
        beside = {}
        if theirs.is_file():
            with theirs.open_input_stream() as f:
                beside = read_datacompdr(f)[0]
        return ("key", dict(zip(cols["key"], zip(cols["caption"], cols["syn_captions"], cols["syn_scores"],
                                                 errors_from(table)))), None, beside)
    if theirs.is_file():
        with theirs.open_input_stream() as f:
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


def _match(found: tuple, key: str, meta: str | None, shard: str) -> tuple[RowError | None, object]:
    """(row error | None, the row's recaption: (caption, syn_captions, syn_scores, error) by key, a DrSample by uid;
    a row without a uid is looked up by its key, as the recaption stage's teachers write it)."""
    by, table, broken = found[:3]
    if by == "key":
        hit = table.get(key)
        if hit is None:
            return row_error("no_recaption_for_key", shard=shard), None
        if hit[3] is not None:
            return row_error("recaption_failed", f"{hit[3].code}: {hit[3].detail}", shard), None
        return None, hit
    uid, sha = _uid_and_sha(meta)
    hit = table.get(uid if uid is not None else key)
    if hit is None:
        why = "the image row has no uid" if uid is None else f"uid {uid}"
        return row_error("no_recaption_for_uid", why + (f" (shard ended: {broken})" if broken else ""), shard), None
    if sha and hit.sha256 and sha.lower() != hit.sha256.lower():
        return row_error("sha256_mismatch", f"uid {uid}: image {sha[:16]} != DataCompDR {hit.sha256[:16]}",
                         shard), None
    return None, hit


def column_list(batch: pa.Table, name: str) -> list:
    """A column as a Python list; a column the batch lacks (older shards: no DataCompDR fields) as Nones."""
    return batch.column(name).to_pylist() if name in batch.column_names else [None] * batch.num_rows


def check_scores(syn, scores, source: str, key: str) -> None:
    """captions.min_score needs a score for each synthetic caption: a row without (an older recaption, a layout
    that carries none) is a one-line DataError naming the file its captions came from."""
    if kept_synthetic(syn) and (scores is None or len(scores) != len(syn) or any(x is None for x in scores)):
        got = "none" if scores is None else f"{len(scores)} for {len(syn)} captions"
        raise DataError(f"{source}: key {key} has no syn_scores ({got}); captions.min_score needs every synthetic "
                        "caption's CLIP score (recaption with a teachers: section writes them) or must be unset")


def join_recaptions(batch: pa.Table, recaptions: Storage | None, policy: str,
                    min_score: float | None = None) -> pa.Table:
    """Canonical rows -> the same rows with captions (and their scores) from the recaption files (ours by key,
    DataCompDR's by uid, with its teacher embeddings and augmentation parameters); every problem becomes a row
    error, except missing scores under `min_score` (`check_scores`)."""
    keys, caps, syns, scores, metas, augs, embs, shards = (column_list(batch, c) for c in (
        "key", "caption", "syn_captions", "syn_scores", "meta", "aug_params", "teacher_emb", "shard"))
    errs = errors_from(batch)
    for i in range(batch.num_rows):
        if errs[i] is not None:
            continue
        source = shards[i]  # where the row's captions come from
        if recaptions is not None:
            stem = shard_name(shards[i])
            found = _recaption_table(recaptions, stem)
            if found is None:
                base = recaptions.child(stem).uri
                errs[i] = row_error("no_recaption_file", f"{base}.tar (DataCompDR) or {base}.parquet", shards[i])
                continue
            errs[i], hit = _match(found, keys[i], metas[i], shards[i])
            if errs[i] is not None:
                continue
            if found[0] == "uid":
                syns[i], scores[i], augs[i], embs[i] = hit.syn, hit.syn_score, hit.aug_params, hit.teacher_emb
                source = recaptions.child(f"{stem}.tar").uri
            else:
                caps[i], syns[i], scores[i] = hit[0] if hit[0] is not None else caps[i], hit[1], hit[2]
                source = recaptions.child(f"{stem}.parquet").uri
                dr = found[3].get(_uid_and_sha(metas[i])[0] or keys[i])
                if dr is not None:  # teacher embeddings and views written beside our captions
                    augs[i], embs[i] = dr.aug_params, dr.teacher_emb
        if min_score is not None and policy != "real":
            check_scores(syns[i], scores[i], source, keys[i])
        code = missing_for(policy, caps[i], syns[i], scores[i], min_score)
        if code:
            errs[i] = row_error(code, shard=shards[i])
    return pa.table({"key": batch.column("key"), "image_bytes": batch.column("image_bytes"),
                     "caption": pa.array(caps, pa.string()), "syn_captions": pa.array(syns, pa.list_(pa.string())),
                     "syn_scores": pa.array(scores, pa.list_(pa.float32())),
                     "meta": batch.column("meta"), **error_columns(errs), "shard": batch.column("shard"),
                     "aug_params": pa.array(augs, pa.string()), "teacher_emb": pa.array(embs, pa.binary())})
