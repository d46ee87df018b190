"""Shard I/O: webdataset tars and Parquet -> Ray Datasets with one canonical schema; Parquet out.

Canonical row (ARCHITECTURE.md): key, image_bytes, caption, syn_captions, meta, error_code, error, plus `shard` (the
source file) so later stages can write one output per input shard. Bad samples never crash a read: they become
rows with a row error (data/rows.py: `error_code` + `error` detail), and `summarize` counts them by code.
"""
from __future__ import annotations

import json
import tarfile
from typing import Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from clipdense.data.images import DEFAULT_MAX_PIXELS, Validate, check_image
from clipdense.data.paths import expand_paths, filesystem_for
from clipdense.data.rows import ERROR_FIELDS, RowError, count_codes, error_columns, errors_from, row_error

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SCHEMA = pa.schema([
    ("key", pa.string()),
    ("image_bytes", pa.binary()),
    ("caption", pa.string()),
    ("syn_captions", pa.list_(pa.string())),
    ("meta", pa.string()),
    *ERROR_FIELDS,
    ("shard", pa.string()),
])


def image_row_error(data: bytes | None, validate: Validate, shard: str | None,
                    max_pixels: int = DEFAULT_MAX_PIXELS) -> RowError | None:
    problem = check_image(data, validate, max_pixels)
    return None if problem is None else row_error(problem.code, problem.detail, shard)


def _sample_row(key: str, files: dict[str, bytes], shard: str, validate: Validate, max_pixels: int) -> dict:
    image = next((files[e] for e in IMAGE_EXTS if e in files), None)
    caption = files["txt"].decode("utf-8", "replace").strip() if "txt" in files else None
    syn = None
    if "syn.json" in files:
        try:
            syn = [str(s) for s in json.loads(files["syn.json"])]
        except (ValueError, TypeError):
            syn = None
    meta = files["json"].decode("utf-8", "replace") if "json" in files else None
    if image is None:
        others = sorted(set(files) - {"txt", "json", "syn.json"})
        error = row_error("no_image", f"found: {', '.join(others)}" if others else None, shard)
    else:
        error = image_row_error(image, validate, shard, max_pixels)
    if error is None and not caption:
        error = row_error("no_caption", shard=shard)
    return {"key": key, "image_bytes": image, "caption": caption, "syn_captions": syn, "meta": meta,
            **_error_fields(error), "shard": shard}


def _error_fields(error: RowError | None) -> dict:
    return {"error_code": None if error is None else error.code, "error": None if error is None else error.detail}


class _TailTracker:
    """Wraps a stream and remembers its length and last bytes: Python's streaming tarfile ends silently when a file
    is cut at a header, so completeness is judged by the end-of-archive marker (a zero block) at the very end."""

    def __init__(self, stream):
        self.stream, self.total, self.tail = stream, 0, b""

    def read(self, n=-1):
        data = self.stream.read(n)
        self.total += len(data)
        self.tail = (self.tail + data)[-1024:]
        return data

    def complete(self) -> bool:
        while self.read(1 << 16):
            pass
        zeros = len(self.tail) - len(self.tail.rstrip(b"\0"))
        return self.total % 512 == 0 and zeros >= 512


def _truncated_row(key: str | None, shard: str, why: str) -> dict:
    return {"key": key or f"{shard}#truncated", "image_bytes": None, "caption": None, "syn_captions": None,
            "meta": None, **_error_fields(row_error("truncated_tar", why, shard)), "shard": shard}


def iter_tar_samples(stream, shard: str, validate: Validate = "header",
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[dict]:
    """Group a webdataset tar's members by key (`KEY.ext`) into canonical rows; a truncated tar ends with
    an error row for the sample where it broke instead of raising."""
    key, files = None, {}
    tracked = _TailTracker(stream)
    try:
        with tarfile.open(fileobj=tracked, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name.rsplit("/", 1)[-1]
                base, dot, ext = name.partition(".")
                if not dot or base.startswith("_"):
                    continue  # img2dataset's _stats.json and friends
                data = tar.extractfile(member).read()
                if base != key:
                    if key is not None:
                        yield _sample_row(key, files, shard, validate, max_pixels)
                    key, files = base, {}
                files[ext.lower()] = data
        complete = tracked.complete()
    except (tarfile.TarError, OSError, EOFError) as e:
        yield _truncated_row(key, shard, type(e).__name__)  # the last sample may be cut: report, don't guess
        return
    if not complete:
        yield _truncated_row(key, shard, "no end-of-archive marker")
    elif key is not None:
        yield _sample_row(key, files, shard, validate, max_pixels)


def _rows_to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def _tar_datasource(paths: list[str], validate: Validate, batch_rows: int, filesystem, max_pixels: int):
    from ray.data.datasource import FileBasedDatasource

    class TarShards(FileBasedDatasource):
        # Ray's read_webdataset raises on a truncated tar; this keeps every readable sample and records the break.
        def _read_stream(self, f, path):
            rows = []
            for row in iter_tar_samples(f, path if "://" in path or path.startswith("/") else f"s3://{path}", validate,
                                        max_pixels):
                rows.append(row)
                if len(rows) >= batch_rows:
                    yield _rows_to_table(rows)
                    rows = []
            if rows:
                yield _rows_to_table(rows)

    return TarShards(paths, filesystem=filesystem)


def _canonical_parquet_batch(batch: pa.Table, columns: dict[str, str], validate: Validate,
                             require_image: bool, max_pixels: int = DEFAULT_MAX_PIXELS) -> pa.Table:
    n = batch.num_rows
    out = {}
    for name in SCHEMA.names:
        src = columns.get(name, name)
        if src in batch.column_names:
            out[name] = batch.column(src).cast(SCHEMA.field(name).type)
        else:
            out[name] = pa.nulls(n, SCHEMA.field(name).type)
    # errors the input already records (either format: an `error` string alone is an old-format row error)
    given = {f: batch.column(columns.get(f, f)) for f in ("error_code", "error")
             if columns.get(f, f) in batch.column_names}
    errors = errors_from({**given, "key": out["key"], "shard": out["shard"]})
    images, captions, shards = out["image_bytes"].to_pylist(), out["caption"].to_pylist(), out["shard"].to_pylist()
    for i in range(n):
        if errors[i] is None:
            err = image_row_error(images[i], validate, shards[i], max_pixels) if require_image else None
            if err is None and not captions[i]:
                err = row_error("no_caption", shard=shards[i])
            errors[i] = err
    out.update(error_columns(errors))
    return pa.table(out, schema=SCHEMA)


def read_shards(paths, *, validate: Validate = "header", s3_endpoint: str | None = None,
                parquet_columns: dict[str, str] | None = None, batch_rows: int = 256, require_image: bool = True,
                max_pixels: int = DEFAULT_MAX_PIXELS):
    """A Ray Dataset of canonical rows from tar and/or Parquet shards (paths, globs, brace ranges, s3://);
    `max_pixels` is the decompression-bomb guard of the header/full image checks."""
    import ray.data

    files = expand_paths(paths, s3_endpoint=s3_endpoint)
    tars = [f for f in files if f.endswith(".tar")]
    parquets = [f for f in files if f.endswith(".parquet")]
    fs = filesystem_for(files[0], s3_endpoint)[0] if files[0].startswith("s3://") else None
    strip = (lambda p: p[len("s3://"):]) if fs is not None else (lambda p: p)
    parts = []
    if tars:
        ds = ray.data.read_datasource(_tar_datasource([strip(p) for p in tars], validate, batch_rows, fs, max_pixels))
        parts.append(ds)
    if parquets:
        cols = parquet_columns or {}
        ds = ray.data.read_parquet([strip(p) for p in parquets], filesystem=fs, include_paths=True)
        if "shard" not in cols:
            cols = {**cols, "shard": "path"}
        parts.append(ds.map_batches(_canonical_parquet_batch, batch_format="pyarrow",
                                    fn_kwargs={"columns": cols, "validate": validate, "require_image": require_image,
                                               "max_pixels": max_pixels}))
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


def read_shard_local(path: str, validate: Validate = "header", s3_endpoint: str | None = None,
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> list[dict]:
    """All canonical rows of one tar shard, without Ray (for tests and small tools)."""
    fs, inner = filesystem_for(path, s3_endpoint)
    with fs.open_input_stream(inner) as f:
        return list(iter_tar_samples(f, path, validate, max_pixels))


def summarize(ds) -> dict:
    """Counts: rows, ok, and errors by code."""
    rows, ok, errors = 0, 0, {}
    for batch in ds.select_columns(["error_code"]).iter_batches(batch_format="pyarrow", batch_size=4096):
        n_ok, counts = count_codes(batch.column("error_code").to_pylist())
        rows, ok = rows + batch.num_rows, ok + n_ok
        for code, k in counts.items():
            errors[code] = errors.get(code, 0) + k
    return {"rows": rows, "ok": ok, "errors": dict(sorted(errors.items()))}


def write_parquet(rows: list[dict] | pa.Table, path: str, s3_endpoint: str | None = None,
                  schema: pa.Schema | None = None) -> None:
    """Write one Parquet file atomically (temp name, then rename), local or s3://."""
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=schema)
    fs, inner = filesystem_for(path, s3_endpoint)
    parent = inner.rsplit("/", 1)[0]
    if not isinstance(fs, pafs.LocalFileSystem):
        # An object-store PUT is atomic already: the object appears only once the upload completes.
        with fs.open_output_stream(inner) as f:
            pq.write_table(table, f)
        return
    fs.create_dir(parent, recursive=True)
    tmp = f"{parent}/.tmp-{inner.rsplit('/', 1)[-1]}"
    with fs.open_output_stream(tmp) as f:
        pq.write_table(table, f)
    fs.move(tmp, inner)
