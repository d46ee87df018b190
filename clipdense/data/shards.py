"""Shard I/O: webdataset tars and Parquet -> Ray Datasets with one canonical schema; Parquet out.

Canonical row (ARCHITECTURE.md): key, image_bytes, caption, syn_captions, meta, error_code, error, plus `shard` (the
source file) so later stages can write one output per input shard, and DataCompDR's optional aug_params and
teacher_emb. An img2dataset tar's sidecar parquet adds the URLs the tar lacks as rows coded by their status. Bad
samples never crash a read: they become rows with a row error (data/rows.py: `error_code` + `error` detail), and
`summarize` counts them by code.

Locations are `Storage` values (data/storage.py), never a URI string plus an endpoint:
- `read_shards(shards: ShardFiles, ...)`: the Ray Dataset of the shards `data.paths.expand_shards` listed;
- `read_shard_local(file: Storage, ...)`: one tar's rows without Ray;
- `write_parquet(rows, dest: Storage, ...)`: one Parquet file, atomically.
"""
from __future__ import annotations

import functools
import json
import re
import tarfile
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from clipdense.data.datacompdr import aug_params_from_json, syn_captions_from_json
from clipdense.data.images import DEFAULT_MAX_PIXELS, Validate, check_image
from clipdense.data.paths import ShardFiles, expand_shards
from clipdense.data.rows import (
    ERROR_FIELDS,
    RowError,
    count_codes,
    error_columns,
    errors_from,
    exception_detail,
    row_error,
)
from clipdense.data.storage import Storage

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SCHEMA = pa.schema([
    ("key", pa.string()),
    ("image_bytes", pa.binary()),
    ("caption", pa.string()),
    ("syn_captions", pa.list_(pa.string())),
    ("meta", pa.string()),
    *ERROR_FIELDS,
    ("shard", pa.string()),
    # DataCompDR's optional per-sample fields (data/datacompdr.py), null elsewhere
    ("aug_params", pa.string()),       # its param_aug: the JSON string of the stored augmentations' parameters
    ("teacher_emb", pa.binary()),      # its npz as stored: image_emb (per augmentation), text_emb (real + synthetic)
])


def image_row_error(data: bytes | None, validate: Validate, shard: str | None,
                    max_pixels: int = DEFAULT_MAX_PIXELS) -> RowError | None:
    problem = check_image(data, validate, max_pixels)
    return None if problem is None else row_error(problem.code, problem.detail, shard)


def _sample_row(key: str, files: dict[str, bytes], shard: str, validate: Validate, max_pixels: int) -> dict:
    image = next((files[e] for e in IMAGE_EXTS if e in files), None)
    caption = (files["txt"].decode("utf-8", "replace").strip() or None) if "txt" in files else None
    syn = syn_captions_from_json(files.get("syn.json"))  # ours (a list) or DataCompDR's {"syn_text": [...]}
    meta = files["json"].decode("utf-8", "replace") if "json" in files else None
    if image is None:
        others = sorted(set(files) - {"txt", "json", "syn.json", "paug.json", "npz", "url.txt"})
        error = row_error("no_image", f"found: {', '.join(others)}" if others else None, shard)
    else:
        error = image_row_error(image, validate, shard, max_pixels)
    # a missing or empty caption is no error here: the captioner needs only the image; the caption policy decides
    return {"key": key, "image_bytes": image, "caption": caption, "syn_captions": syn, "meta": meta,
            **_error_fields(error), "shard": shard, "aug_params": aug_params_from_json(files.get("paug.json")),
            "teacher_emb": files.get("npz")}


def _error_fields(error: RowError | None) -> dict:
    return {"error_code": None if error is None else error.code, "error": None if error is None else error.detail}


class _HeaderProbe(tarfile.TarInfo):
    """Records where and why header reading stopped (`tar.header_stop`): Python's streaming tarfile ends iteration
    silently on a cut, invalid or all-zero header past the first, so the member list alone cannot tell a complete
    tar from a broken one."""

    @classmethod
    def fromtarfile(cls, tar):
        start = tar.fileobj.tell()
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as e:
            tar.header_stop = (start, e)
            raise


@dataclass(frozen=True)
class TarBreak:
    """Where a tar stops being readable: everything from `offset` (a byte offset into the uncompressed tar) on."""
    code: str  # truncated_tar | corrupt_tar
    offset: int
    detail: str


# tarfile names no exception type for a cut stream, only these messages
_CUT_MESSAGES = ("unexpected end of data", "empty file", "truncated header")


def _end_of_archive(tar) -> TarBreak | None:
    """None if the archive ended at an end-of-archive marker (a zero block) followed by zeros only."""
    start, why = getattr(tar, "header_stop", (tar.offset, tarfile.EmptyHeaderError()))
    if isinstance(why, tarfile.EmptyHeaderError):
        return TarBreak("truncated_tar", start, f"file ends at byte {start} without an end-of-archive marker")
    if isinstance(why, tarfile.TruncatedHeaderError):
        return TarBreak("truncated_tar", start, f"file ends inside the header at byte {start}")
    if not isinstance(why, tarfile.EOFHeaderError):
        return TarBreak("corrupt_tar", start, f"bad header at byte {start}: {why}")
    pos = start + tarfile.BLOCKSIZE
    while chunk := tar.fileobj.read(1 << 16):  # a zeroed header in mid-archive also reads as the end: look past it
        if chunk.count(0) != len(chunk):
            at = pos + len(chunk) - len(chunk.lstrip(b"\0"))
            return TarBreak("corrupt_tar", start, f"end-of-archive marker at byte {start} followed by data at "
                                                  f"byte {at}")
        pos += len(chunk)
    return None


def iter_tar_members(stream) -> Iterator[tuple[str, int, bytes] | TarBreak]:
    """(name, header byte offset, data) of each regular file of a tar stream in order, then one TarBreak if the
    archive does not end cleanly. Reading stops at the first cut or unreadable header or member data."""
    tar, reading = None, None
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_HeaderProbe, encoding="utf-8", errors="replace")
        for member in tar:
            if member.isfile():
                reading = member
                data = tar.extractfile(member).read()
                reading = None
                yield member.name, member.offset, data
        end = _end_of_archive(tar)
    except Exception as e:  # tarfile and its decompressors raise many types (ReadError, EOFError, zlib.error, ...)
        cut = isinstance(e, EOFError) or str(e) in _CUT_MESSAGES
        offset = reading.offset if reading is not None else (tar.offset if tar is not None else 0)
        member = f" (member {reading.name})" if reading is not None else ""  # after the offset: details are capped
        end = TarBreak("truncated_tar" if cut else "corrupt_tar", offset,
                       f"at byte {offset}{member}: {exception_detail(e)}")
    if end is not None:
        yield end


def _sample_name(name: str) -> tuple[str, str] | None:
    """`dir/KEY.ext` -> (KEY, ext lowercased); None for members that are no sample file (img2dataset's _stats.json,
    names without an extension or a key)."""
    base, dot, ext = name.rsplit("/", 1)[-1].partition(".")
    return None if not dot or not base or base.startswith("_") else (base, ext.lower())


def _error_row(key: str, shard: str, error: RowError) -> dict:
    return {"key": key, "image_bytes": None, "caption": None, "syn_captions": None, "meta": None,
            **_error_fields(error), "shard": shard}


def iter_tar_samples(stream, shard: str, validate: Validate = "header",
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[dict]:
    """Group a webdataset tar's members into canonical rows: consecutive `KEY.ext` members form a sample (a
    repeated extension starts a new one). Nothing raises and every sample is accounted for:
    - a key seen before in the shard keeps its first sample; each later one is a `duplicate_key` row keyed
      `KEY#duplicate@OFFSET`;
    - where the tar breaks (cut, bad header, data after the end marker), the sample read so far becomes its row as
      it is, and the unreadable rest is one `truncated_tar` / `corrupt_tar` row keyed `SHARD#CODE@OFFSET`, whose
      detail names the byte offset;
    - text members are decoded as UTF-8 with replacement characters (a non-UTF-8 caption stays usable)."""
    key, files, start, seen = None, {}, 0, set()

    def sample_row():
        if key in seen:
            return _error_row(f"{key}#duplicate@{start}", shard, row_error(
                "duplicate_key", f"key {key} again at byte {start}; the first sample is kept", shard))
        seen.add(key)
        return _sample_row(key, files, shard, validate, max_pixels)

    for item in iter_tar_members(stream):
        if isinstance(item, TarBreak):
            if key is not None:
                yield sample_row()
            yield _error_row(f"{shard}#{item.code}@{item.offset}", shard, row_error(item.code, item.detail, shard))
            return
        name, offset, data = item
        parsed = _sample_name(name)
        if parsed is None:
            continue
        if parsed[0] != key or parsed[1] in files:
            if key is not None:
                yield sample_row()
            key, files, start = parsed[0], {}, offset
        files[parsed[1]] = data
    if key is not None:
        yield sample_row()


SIDECAR_READ = ("key", "status", "error_message", "url", "caption")


def _status_code(status: object) -> str:
    code = re.sub(r"[^a-z0-9]+", "_", str(status or "unknown").lower()).strip("_") or "unknown"
    return code if code[0].isalpha() else f"status_{code}"


def sidecar_rows(sidecar: Storage, shard: str, seen: set) -> Iterator[dict]:
    """The URLs of an img2dataset parquet that its tar does not hold, as error rows: failed downloads (code = their
    status: failed_to_download, failed_to_resize, ...; detail = img2dataset's error_message) and `not_in_tar` for a
    "success" the tar lacks (cut short). So every input URL is accounted for."""
    fs, inner = sidecar.locate()
    with fs.open_input_file(inner) as f:
        pf = pq.ParquetFile(f)
        table = pf.read(columns=[c for c in SIDECAR_READ if c in pf.schema_arrow.names])
    cols = {c: table.column(c).to_pylist() if c in table.column_names else [None] * table.num_rows
            for c in SIDECAR_READ}
    for key, status, message, url, caption in zip(*(cols[c] for c in SIDECAR_READ)):
        key = str(key)
        if key in seen:
            continue
        if status == "success":
            error = row_error("not_in_tar", f"{sidecar.uri} lists it as downloaded", shard)
        else:
            error = row_error(_status_code(status), message or status, shard)
        meta = json.dumps({"url": url, "status": status, "error_message": message})
        yield {"key": key, "image_bytes": None, "caption": caption or None, "syn_captions": None, "meta": meta,
               **_error_fields(error), "shard": shard}


def shard_rows(stream, shard: str, validate: Validate = "header", max_pixels: int = DEFAULT_MAX_PIXELS,
               sidecar: Storage | None = None) -> Iterator[dict]:
    """A tar's canonical rows, then (img2dataset) the URLs its sidecar parquet lists that the tar lacks."""
    seen = set()
    for row in iter_tar_samples(stream, shard, validate, max_pixels):
        seen.add(row["key"])
        yield row
    if sidecar is not None:
        yield from sidecar_rows(sidecar, shard, seen)


def _rows_to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SCHEMA)


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
            rows = []
            shard = path if "://" in path or path.startswith("/") else f"s3://{path}"
            for row in shard_rows(f, shard, validate, max_pixels, sidecars.get(shard)):
                rows.append(row)
                if len(rows) >= batch_rows:
                    yield _rows_to_table(rows)
                    rows = []
            if rows:
                yield _rows_to_table(rows)

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
    fs = shards.storage.locate(files[0])[0] if files[0].startswith("s3://") else None
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
    fs, inner = file.locate()
    found = expand_shards(file).sidecars if file.uri.endswith(".tar") else {}
    sidecar = file.at(next(iter(found.values()))) if found else None
    with fs.open_input_stream(inner) as f:
        return list(shard_rows(f, file.uri, validate, max_pixels, sidecar))


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
    fs, inner = dest.locate()
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
