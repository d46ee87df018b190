"""Pretrain data: shards joined with recaptions (Ray Data, per shard, no shuffle) -> decoded uint8 images.

Pipeline (all lazy Ray Data, CPU tasks):
  read_shards(shards)                         canonical rows (bad samples are rows with `error`)
  -> map_batches(join_recaptions)             (pretrain/join.py) caption/syn_captions from `<recaptions>/<shard
                                              stem>.parquet` by key,
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
Where the rows come from arrives resolved (`Sources`: listed shards and `Storage` values, built once by the stage's
entry). Ray Data's types are imported where they are used: importing the pretrain task (its collate wraps into
`typed_collate` here) must not import Ray (the GPU bench runs the stages' cores without it).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipdense.config import DataError, raise_user_error_behind
from clipdense.data.images import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    crop_source_side,
    decode_crop_source,
    decode_square,
    open_image,
)
from clipdense.data.paths import ShardFiles
from clipdense.data.shards import READ_TASK_BYTES, cluster_cpus, read_shards
from clipdense.data.storage import Storage
from clipdense.pretrain.captions import kept_synthetic
from clipdense.pretrain.config import DataConfig, EvalConfig
from clipdense.pretrain.crops import CROP_SCALE
from clipdense.pretrain.join import JOIN_MISSED, column_list, join_recaptions
from clipdense.ray_session import data_context


@dataclass(frozen=True)
class Sources:
    """Where rows come from: the listed shards (with their sidecars) and the recaptions joined to them, with the
    caption policy the rows must satisfy and the least CLIP score of a synthetic caption (`captions.min_score`)."""
    shards: ShardFiles
    recaptions: Storage | None
    policy: str
    min_score: float | None = None


def typed_collate(collate):
    """A collate (pretrain/batches.py) as Ray Data's typed collate: a bare callable is deprecated since Ray 2.47."""
    return _typed_collate_class()(collate)


@functools.cache
def _typed_collate_class():
    from ray.data.collate_fn import NumpyBatchCollateFn  # lazy: importing the task needs no Ray (module docstring)

    class TypedCollate(NumpyBatchCollateFn):
        def __init__(self, collate):
            self.collate = collate

        def __call__(self, batch: dict) -> dict:
            return self.collate(batch)

    return TypedCollate


def _tensor_column(images: list[np.ndarray]):
    """Images of different shapes as one Ray variable-shaped tensor column (numpy batches get an object array of
    (h, w, 3) views, zero-copy); always this type, also when the shapes agree, so every block has one schema."""
    from ray.data.extensions import ArrowVariableShapedTensorArray, ArrowVariableShapedTensorType  # lazy: see top

    if not images:  # Ray builds no empty ragged array from numpy
        kind = ArrowVariableShapedTensorType(pa.uint8(), 3)
        return pa.ExtensionArray.from_storage(kind, pa.array([], kind.storage_type))
    arr = np.empty(len(images), dtype=object)
    for i, im in enumerate(images):
        arr[i] = im
    return ArrowVariableShapedTensorArray.from_numpy(arr)


# the decoded rows' columns, as the collate (pretrain/batches.py) takes them
KEPT_COLUMNS = ("key", "caption", "syn_captions", "syn_scores", "pixels", "aug_params", "teacher_emb", "orig_w",
                "orig_h")


def _decoded_table(out: dict, size: int, crop_source: bool) -> pa.Table:
    from ray.data.extensions import ArrowTensorArray  # lazy: see the module docstring

    if crop_source:
        pixels = _tensor_column(out["pixels"])
    else:
        pixels = ArrowTensorArray.from_numpy(np.stack(out["pixels"]) if out["pixels"] else
                                             np.zeros((0, size, size, 3), np.uint8))
    # typed columns: a numpy batch would turn an all-null column (no DataCompDR fields) into float NaNs
    return pa.table({"key": pa.array(out["key"], pa.string()), "caption": pa.array(out["caption"], pa.string()),
                     "syn_captions": pa.array(out["syn_captions"], pa.list_(pa.string())),
                     "syn_scores": pa.array(out["syn_scores"], pa.list_(pa.float32())),
                     "pixels": pixels, "orig_w": pa.array(out["orig_w"], pa.int32()),
                     "orig_h": pa.array(out["orig_h"], pa.int32()),
                     "aug_params": pa.array(out["aug_params"], pa.string()),
                     "teacher_emb": pa.array(out["teacher_emb"], pa.binary())})


def decode_ok(batch: pa.Table, size: int, drop_keys: frozenset = frozenset(), only_keys: frozenset | None = None,
              crop_source: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS, encoded: bool = False):
    """Keep rows without error (minus `drop_keys`, or only `only_keys`), decoded to `pixels`; undecodable rows drop.
    `crop_source` (training): each whole image, aspect kept, JPEG-draft reduced to no less than a crop of `size`
    needs (`decode_crop_source`), in a variable-shaped tensor column, with its original `orig_w`/`orig_h` (the
    collate draws the crop on that geometry); otherwise (eval) open_clip's eval geometry, size x size (with the
    original size too). `encoded` (data.decode_on worker | gpu, training): no decode, the header checked (pixel
    guard) and the encoded bytes shipped as `image_bytes` with `orig_w`/`orig_h` (pretrain/gpu_decode.py decodes
    them)."""
    if encoded:
        return _encoded_ok(batch, drop_keys, max_pixels)
    rows = zip(*(column_list(batch, c) for c in ("key", "error_code", "image_bytes", "caption", "syn_captions",
                                                 "syn_scores", "aug_params", "teacher_emb")))
    usable = ((k, d, c, s, sc, a, t) for k, e, d, c, s, sc, a, t in rows
              if e is None and k not in drop_keys and (only_keys is None or k in only_keys))
    return _decoded_table(decoded_columns(usable, size, crop_source, max_pixels), size, crop_source)


def decoded_columns(rows, size: int, crop_source: bool, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, list]:
    """Usable joined rows (key, image bytes, caption, syn_captions, syn_scores, aug_params, teacher_emb) -> the
    decoded columns `KEPT_COLUMNS` (as `decode_ok` describes); a row whose pixels do not decode is left out."""
    min_side = crop_source_side(size, CROP_SCALE[0])
    out: dict[str, list] = {name: [] for name in KEPT_COLUMNS}
    for k, d, c, s, sc, a, t in rows:
        try:
            if crop_source:
                px, (w, h) = decode_crop_source(d, min_side, max_pixels)
            else:
                w, h = open_image(d, max_pixels).size  # a header parse: eval rows are few
                px = decode_square(d, size, max_pixels)
        except ImageError:  # the header looked fine, the pixels do not (validate_images=full counts it)
            continue
        for name, value in zip(KEPT_COLUMNS, (k, c, list(s) if s is not None else [], sc, px, a, t, w, h)):
            out[name].append(value)
    return out


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
    cols = ["key", "caption", "syn_captions", "syn_scores", "image_bytes", "aug_params", "teacher_emb"]
    return pa.table({**{c: rows.column(c) for c in cols if c in rows.column_names},
                     "orig_w": pa.array([w for w, _ in sizes], pa.int32()),
                     "orig_h": pa.array([h for _, h in sizes], pa.int32())})


def joined_rows(sources: list[Sources], data: DataConfig) -> list[tuple]:
    """For each of `sources`: (its canonical rows joined with their recaptions, the batch size of the maps that follow:
    None or `data.decode_batch_size`). Read tasks of ~READ_TASK_BYTES, their blocks (`decode_batch_size` rows) not
    split. With two shards per cluster CPU every CPU has read tasks of its own: the maps take whole blocks (no batch
    size), so Ray fuses the join and the decode into the read tasks and the encoded images never cross the object
    store; with fewer shards the maps stay apart and take blocks as the reads stream them, on every CPU."""
    cpus = cluster_cpus()
    batches = [None if sum(f.endswith(".tar") for f in s.shards.files) >= 2 * cpus else data.decode_batch_size
               for s in sources]
    rows = [read_shards(s.shards, validate=data.validate_images, batch_rows=data.decode_batch_size,
                        task_bytes=READ_TASK_BYTES) for s in sources]
    return [(r.map_batches(join_recaptions, batch_format="pyarrow", batch_size=b,
                           fn_kwargs={"recaptions": s.recaptions, "policy": s.policy, "min_score": s.min_score},
                           num_cpus=data.decode_cpus), b)
            for r, b, s in zip(rows, batches, sources)]


def _tally_scores(usable: pa.Table, min_score: float, tally: dict) -> None:
    """captions.min_score: the usable rows' synthetic captions kept and below it, and the rows left with none (mix:
    they train their real caption)."""
    for syn, scores in zip(usable.column("syn_captions").to_pylist(), usable.column("syn_scores").to_pylist()):
        kept, usable_syn = len(kept_synthetic(syn, scores, min_score)), len(kept_synthetic(syn))
        tally["captions_kept"] += kept
        tally["captions_below_min_score"] += usable_syn - kept
        tally["rows_real_only"] += kept == 0


def count_columns(min_score: float | None) -> list[str]:
    """The joined rows' columns `count_rows` reads."""
    return ["error_code", "syn_captions", "teacher_emb"] + (["syn_scores"] if min_score is not None else [])


def count_rows(batches, min_score: float | None = None) -> dict:
    """Over the joined rows (`batches`: pyarrow tables with `count_columns`): rows, usable rows, errors by code, and
    the synthetic captions: usable rows carrying them, their mean number per such row, the rows the recaption join
    missed (no file, key or uid) and those carrying teacher embeddings; with `min_score` (captions.min_score) also
    it and `_tally_scores`'."""
    rows, ok, errors, with_syn, n_syn, with_teacher = 0, 0, {}, 0, 0, 0
    tally = dict.fromkeys(("captions_kept", "captions_below_min_score", "rows_real_only"), 0)
    for batch in batches:
        codes = batch.column("error_code")
        rows, ok = rows + batch.num_rows, ok + codes.null_count
        for hit in pc.value_counts(codes.drop_null()).to_pylist():
            errors[hit["values"]] = errors.get(hit["values"], 0) + hit["counts"]
        usable = batch.filter(pc.is_null(batch.column("error_code")))
        lengths = pc.fill_null(pc.list_value_length(usable.column("syn_captions")), 0)
        with_syn += int(pc.sum(pc.greater(lengths, 0)).as_py() or 0)
        n_syn += int(pc.sum(lengths).as_py() or 0)
        with_teacher += int(pc.sum(pc.is_valid(usable.column("teacher_emb"))).as_py() or 0)
        if min_score is not None:
            _tally_scores(usable, min_score, tally)
    synthetic = {"rows_with": with_syn, "per_row_mean": round(n_syn / with_syn, 3) if with_syn else 0.0,
                 "join_missed": sum(errors.get(c, 0) for c in JOIN_MISSED), "rows_with_teacher_emb": with_teacher}
    if min_score is not None:
        synthetic.update({"min_score": min_score, **tally})
    return {"rows": rows, "ok": ok, "errors": dict(sorted(errors.items())), "synthetic": synthetic}


# a user error's line in a Ray task's traceback: Ray Data keeps the text of a task's error, not the error itself
def _counted(joined, min_score: float | None) -> dict:
    """`count_rows`; a user error raised in the join's Ray tasks (missing scores, pretrain/join.py) as its line."""
    try:
        cols = count_columns(min_score)
        return count_rows(joined.select_columns(cols).iter_batches(batch_format="pyarrow", batch_size=4096), min_score)
    except Exception as e:
        raise_user_error_behind(e)
        raise


def first_ok_keys(batches, n: int) -> tuple[list[str], int]:
    """The keys of the first `n` usable rows of the joined rows (`batches`: pyarrow tables with key and error_code,
    in input order: the held-out split) and the rows scanned to find them."""
    keys: list[str] = []
    seen = 0
    for batch in batches:
        for k, e in zip(batch.column("key").to_pylist(), batch.column("error_code").to_pylist()):
            seen += 1
            if e is None:
                keys.append(k)
                if len(keys) >= n:
                    return keys, seen
    return keys, seen


def check_counts(counts: dict, shards, distill: bool) -> None:
    """The counts (`count_rows`; {}: not counted) of the training rows of `shards`: none usable is a one-line error,
    and so is loss.distill (`distill`) without DataCompDR teacher embeddings in any usable row; rows without them
    train only the contrastive term (masked out of distillation), their number is in the counts."""
    if counts and counts["ok"] == 0:
        raise DataError(f"no usable training rows in {shards!r} (errors: {counts['errors']})")
    if distill and counts and counts["synthetic"]["rows_with_teacher_emb"] == 0:
        raise DataError(f"loss.distill is on but no usable row of {shards!r} carries DataCompDR teacher "
                        f"embeddings (data.recaptions must name DataCompDR .tar shards with npz members)")


def build_datasets(train: Sources, held_out: Sources | None, data: DataConfig, ev: EvalConfig, image_size: int,
                   distill: bool = False) -> tuple[object, object | None, dict]:
    """(train dataset, eval dataset or None, counts) as lazy Ray Datasets of key/caption/syn_captions/pixels/orig_w/
    orig_h (+ DataCompDR's aug_params/teacher_emb). `held_out`: the rows of `eval.path`, else the first
    `eval.holdout` usable training rows are held out; `distill`: loss.distill needs teacher embeddings."""
    with data_context({"execution_options.preserve_order": True}):  # the same rows in the same order each epoch
        (joined, batch), *held_out_rows = joined_rows([train] + ([held_out] if held_out else []), data)
        counts = _counted(joined, train.min_score) if data.count_errors else {}
        check_counts(counts, data.shards, distill)
        eval_ds, held = _eval_dataset(joined, held_out_rows[0] if held_out_rows else None, data, ev, image_size)
        train_ds = joined.map_batches(decode_ok, fn_kwargs={"size": image_size, "drop_keys": held,
                                                            "crop_source": True, "encoded": data.decode_on != "cpu"},
                                      batch_size=batch, batch_format="pyarrow", num_cpus=data.decode_cpus)
        if data.cache:  # decoded whole images only: the random crop runs in the worker's collate, seeded per epoch
            train_ds = train_ds.materialize()
        if eval_ds is not None:
            eval_ds = eval_ds.materialize()  # small; read once, iterated at every eval
            counts["eval_rows"] = eval_ds.count()
        counts["holdout_rows"] = len(held)
        return train_ds, eval_ds, counts


def _eval_dataset(joined, held_out: tuple | None, data: DataConfig, ev: EvalConfig, image_size: int):
    """(the eval rows decoded at open_clip's eval geometry or None, the training keys held out for them);
    `held_out`: the joined rows of `eval.path` and their batch size, or None."""
    decode_kw = {"batch_format": "pyarrow", "num_cpus": data.decode_cpus}
    if held_out is None and ev.holdout:
        keys, scanned = first_ok_keys(joined.select_columns(["key", "error_code"]).iter_batches(
            batch_format="pyarrow", batch_size=256), ev.holdout)
        held = frozenset(keys)
        return joined.limit(scanned).map_batches(decode_ok, fn_kwargs={"size": image_size, "only_keys": held},
                                                 batch_size=data.decode_batch_size, **decode_kw), held
    if held_out is None:
        return None, frozenset()
    ejoined, ebatch = held_out
    return ejoined.map_batches(decode_ok, fn_kwargs={"size": image_size}, batch_size=ebatch,
                               **decode_kw).limit(ev.max_rows), frozenset()
