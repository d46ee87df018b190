"""A webdataset tar shard -> canonical rows, without Ray.

Canonical row (ARCHITECTURE.md): key, image_bytes, caption, syn_captions, meta, error_code, error, plus `shard` (the
source file) so later stages can write one output per input shard, and DataCompDR's optional aug_params and
teacher_emb. An img2dataset tar's sidecar parquet adds the URLs the tar lacks as rows coded by their status. Bad
samples never crash a read: they become rows with a row error (data/rows.py: `error_code` + `error` detail).
"""
from __future__ import annotations

import json
import re
import tarfile
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from clipdense.data.datacompdr import aug_params_from_json, syn_captions_from_json
from clipdense.data.images import DEFAULT_MAX_PIXELS, ImageError, Validate, check_image, decode_rgb
from clipdense.data.paths import ShardFiles
from clipdense.data.rows import ERROR_FIELDS, RowError, exception_detail, row_error
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
    with sidecar.open_input_file() as f:
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


def _input_images(shards: ShardFiles) -> Iterator[tuple[str, bytes]]:
    """(key, encoded image) of every input row that has an image, in shard order."""
    for uri in shards.files:
        with shards.storage.at(uri).open_input_file() as f:
            if uri.endswith(".tar"):
                rows = iter_tar_samples(f, uri, "none")
            else:
                rows = pq.read_table(f, columns=["key", "image_bytes"]).to_pylist()
            yield from ((r["key"], r["image_bytes"]) for r in rows if r.get("image_bytes"))


def sample_images(shards: ShardFiles, keys: set[str], limit: int, max_image_pixels: int) -> dict:
    """The first `limit` images of these keys in the input shards, decoded (key -> PIL image). One that does not
    decode is left out (the same key in another input shard may hold other bytes)."""
    found: dict[str, bytes] = {}
    for key, blob in _input_images(shards):
        if key in keys:
            found[key] = blob
            if len(found) >= limit:
                break
    decoded = {}
    for key, blob in found.items():
        try:
            decoded[key] = decode_rgb(blob, max_image_pixels)
        except ImageError:
            continue
    return decoded
