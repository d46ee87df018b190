"""Shard I/O: webdataset tars and Parquet -> Ray Datasets with one canonical schema (data/tar_rows.py: SCHEMA and
how a tar's members become rows); Parquet out.

Bad samples never crash a read: they become rows with a row error (data/rows.py: `error_code` + `error` detail), and
`summarize` counts them by code.

Locations are `Storage` values (data/storage.py), never a URI string plus an endpoint:
- `read_shards(shards: ShardFiles, ...)`: the Ray Dataset of the shards `data.paths.expand_shards` listed;
- `read_shard_local(file: Storage, ...)`: one tar's rows without Ray;
- `shard_tables(file, sidecar, ...)`: one shard's (tar or Parquet) canonical rows as tables, without Ray;
- `write_parquet(rows, dest: Storage, ...)`: one Parquet file, atomically.
"""
from __future__ import annotations

import functools
from typing import Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from clipdense.data.images import DEFAULT_MAX_PIXELS, Validate
from clipdense.data.paths import ShardFiles, expand_shards
from clipdense.data.rows import count_codes, error_columns, errors_from
from clipdense.data.storage import Storage
from clipdense.data.tar_rows import SCHEMA, image_row_error, shard_rows


def _rows_to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def _row_tables(rows: Iterator[dict], batch_rows: int) -> Iterator[pa.Table]:
    chunk: list[dict] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= batch_rows:
            yield _rows_to_table(chunk)
            chunk = []
    if chunk:
        yield _rows_to_table(chunk)


def rebatch(tables: Iterator[pa.Table], rows: int) -> Iterator[pa.Table]:
    """Tables of exactly `rows` rows (the last one shorter) from a stream of tables, in order, across their
    boundaries (zero-copy slices)."""
    buf: list[pa.Table] = []
    n = 0
    for t in tables:
        if t.num_rows == 0:
            continue
        buf.append(t)
        n += t.num_rows
        while n >= rows:
            whole = buf[0] if len(buf) == 1 else pa.concat_tables(buf)
            yield whole.slice(0, rows)
            rest = whole.slice(rows)
            buf, n = ([rest] if rest.num_rows else []), rest.num_rows
    if n:
        yield buf[0] if len(buf) == 1 else pa.concat_tables(buf)


def _tar_datasource(paths: list[str], validate: Validate, batch_rows: int, filesystem, max_pixels: int,
                    sidecars: dict[str, Storage]):
    from ray.data.datasource import FileBasedDatasource, ReadTask

    class TarShards(FileBasedDatasource):
        # Ray's read_webdataset raises on a truncated tar; this keeps every readable sample and records the break.
        def get_read_tasks(self, parallelism: int, **kwargs) -> list:
            # A read task reads a run of shards; its blocks span shard boundaries (`batch_rows` rows each), so a
            # thousand tiny shards make as many blocks as a few large ones, not one block (task, object, actor
            # call, driver round trip) per shard. Rows keep their order and their `shard` column.
            return [ReadTask(functools.partial(_rebatched, t.read_fn, batch_rows), t.metadata, t.schema,
                             t.per_task_row_limit) for t in super().get_read_tasks(parallelism, **kwargs)]

        def _read_stream(self, f, path):
            shard = path if "://" in path or path.startswith("/") else f"s3://{path}"
            yield from _row_tables(shard_rows(f, shard, validate, max_pixels, sidecars.get(shard)), batch_rows)

    return TarShards(paths, filesystem=filesystem)


# Input bytes per read task (whole shards, blocks spanning them): with ordered output a later task's decoded blocks
# wait for the earlier ones, and a long task made the others stall under Ray Data's backpressure.
READ_TASK_BYTES = 32 << 20


def cluster_cpus() -> int:
    import ray

    return int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 1


def read_task_count(files: int, total_bytes: int | None, task_bytes: int) -> int:
    """Read tasks for `files` shards of `total_bytes`: one per ~`task_bytes`, at least two per cluster CPU, at most
    one per shard. With ordered output, a task's blocks wait until every earlier task is done; small tasks keep
    that backlog (and Ray Data's backpressure on it) small, and their number follows the bytes, not the shards."""
    by_size = -(-(total_bytes or 0) // task_bytes)
    return max(1, min(files, max(by_size, 2 * cluster_cpus())))


def _rebatched(read_fn, rows: int) -> Iterator[pa.Table]:
    yield from rebatch(iter(read_fn()), rows)


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
    images, shards = out["image_bytes"].to_pylist(), out["shard"].to_pylist()
    for i in range(n):
        if errors[i] is None:
            errors[i] = image_row_error(images[i], validate, shards[i], max_pixels) if require_image else None
    out.update(error_columns(errors))
    return pa.table(out, schema=SCHEMA)


def read_shards(shards: ShardFiles, *, validate: Validate = "header", parquet_columns: dict[str, str] | None = None,
                batch_rows: int = 256, require_image: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS,
                task_bytes: int | None = None):
    """A Ray Dataset of canonical rows from the tar and/or Parquet shards `expand_shards` listed (used as listed:
    no second listing of many shards); `max_pixels` is the decompression-bomb guard of the header/full image checks.
    `task_bytes`: tar read tasks of about this many input bytes each (whole shards; see `read_task_count`), their
    blocks not split by Ray."""
    import ray.data

    files = shards.files
    tars = [f for f in files if f.endswith(".tar")]
    parquets = [f for f in files if f.endswith(".parquet")]
    fs = shards.storage.at(files[0]).fs if files[0].startswith("s3://") else None
    strip = (lambda p: p[len("s3://"):]) if fs is not None else (lambda p: p)
    parts = []
    if tars:
        sidecars = {t: shards.storage.at(p) for t, p in shards.sidecars.items()}
        source = _tar_datasource([strip(p) for p in tars], validate, batch_rows, fs, max_pixels, sidecars)
        tasks = read_task_count(len(tars), source.estimate_inmemory_data_size(), task_bytes) if task_bytes else None
        ds = ray.data.read_datasource(source, override_num_blocks=tasks)
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


def read_shard_local(file: Storage, validate: Validate = "header", max_pixels: int = DEFAULT_MAX_PIXELS) -> list[dict]:
    """All canonical rows of one tar shard, without Ray (for tests and small tools)."""
    fs, inner = file.fs, file.path
    found = expand_shards(file).sidecars if file.uri.endswith(".tar") else {}
    sidecar = file.at(next(iter(found.values()))) if found else None
    with fs.open_input_stream(inner) as f:
        return list(shard_rows(f, file.uri, validate, max_pixels, sidecar))


def shard_tables(file: Storage, sidecar: Storage | None = None, *, validate: Validate = "header",
                 batch_rows: int = 256, max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[pa.Table]:
    """One tar or Parquet shard's canonical rows without Ray, `batch_rows` at a time, as `read_shards` reads them
    (the `shard` column: the file's URI); `sidecar`: a tar's img2dataset parquet."""
    if file.uri.endswith(".tar"):
        with file.open_input_stream() as f:
            yield from _row_tables(shard_rows(f, file.uri, validate, max_pixels, sidecar), batch_rows)
        return
    with file.open_input_file() as f:
        for part in pq.ParquetFile(f).iter_batches(batch_rows):
            table = pa.Table.from_batches([part])
            table = table.append_column("path", pa.array([file.uri] * table.num_rows, pa.string()))
            yield _canonical_parquet_batch(table, {"shard": "path"}, validate, True, max_pixels)


def summarize(ds) -> dict:
    """Counts: rows, ok, and errors by code."""
    rows, ok, errors = 0, 0, {}
    for batch in ds.select_columns(["error_code"]).iter_batches(batch_format="pyarrow", batch_size=4096):
        n_ok, counts = count_codes(batch.column("error_code").to_pylist())
        rows, ok = rows + batch.num_rows, ok + n_ok
        for code, k in counts.items():
            errors[code] = errors.get(code, 0) + k
    return {"rows": rows, "ok": ok, "errors": dict(sorted(errors.items()))}


def write_parquet(rows: list[dict] | pa.Table, dest: Storage, schema: pa.Schema | None = None) -> None:
    """Write one Parquet file atomically (temp name, then rename), local or s3://."""
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=schema)
    fs, inner = dest.fs, dest.path
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
