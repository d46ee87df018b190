"""Row errors, stored structured: a short code (what went wrong, for counting) and a detail (the specifics).

Every stage records a bad row instead of dropping it: its `error_code` column holds one of `CODES` (or a code a
later stage adds) and its `error` column the detail. Both are null exactly on usable rows, so a reader that only
looks at `error` still tells good rows from bad ones. Details are deterministic: object reprs with memory
addresses (PIL names `<_io.BytesIO object at 0x...>`) are stripped, whitespace collapsed, length capped.

Outputs written before the code column existed hold one string, `reason (detail) [shard]`, in `error`;
`errors_from` reads those too (`parse_legacy`), so old recaption outputs stay usable.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import pyarrow as pa

CODES = {
    "no_image": "no image in the sample",
    "undecodable_image": "the image does not decode",
    "image_too_large": "more pixels than the limit (decompression-bomb guard)",
    "no_caption": "no caption text",
    "no_synthetic_captions": "no synthetic captions",
    "truncated_tar": "the tar file ends early (the detail names the byte offset)",
    "corrupt_tar": "an unreadable tar header, or data after the end-of-archive marker (the detail names the offset)",
    "duplicate_key": "the key appeared earlier in the shard (the first sample is kept)",
    "no_recaption_file": "no recaption file for the shard",
    "no_recaption_for_key": "the shard's recaption file has no row for the key",
    "recaption_failed": "the recaption row is an error row",
    "caption_engine_failed": "the captioner failed on the row's batch",
    "teacher_failed": "a teacher's forward failed on the row (recaption with teachers: no DataCompDR entry)",
    # img2dataset's per-URL statuses (its sidecar parquet): the URL never became a sample of the tar
    "failed_to_download": "img2dataset could not download the URL",
    "failed_to_resize": "img2dataset could not resize the downloaded image",
    "not_in_tar": "img2dataset's parquet lists the URL as downloaded, its tar has no sample for it",
    # DataCompDR recaptions joined by uid to DataComp image shards
    "no_recaption_for_uid": "the DataCompDR shard has no sample with the image's uid",
    "sha256_mismatch": "the image's sha256 differs from DataCompDR's (its augmentations and embeddings do not hold)",
}
ERROR_FIELDS = (pa.field("error_code", pa.string()), pa.field("error", pa.string()))
DETAIL_CHARS = 200

_OBJECT_REPR = re.compile(r"<([\w.]+) object at 0x[0-9a-fA-F]+>")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_CODE = re.compile(r"^[a-z][a-z0-9_]*$")
# `reason (detail) [shard]`; the detail may itself hold brackets and parentheses (nested old errors)
_LEGACY = re.compile(r"^(?P<reason>[^(\[]*?)\s*(?:\((?P<detail>.*)\))?\s*(?:\[(?P<shard>[^\[\]]*)\])?\s*$", re.S)
_LEGACY_CODES = {"truncated or corrupt tar": "truncated_tar", "no recaption file for shard": "no_recaption_file"}


def clean_text(text: object, limit: int = DETAIL_CHARS) -> str:
    """One deterministic line: no memory addresses, single spaces, at most `limit` characters."""
    text = _ADDRESS.sub("", _OBJECT_REPR.sub(r"<\1>", str(text)))
    return " ".join(text.split())[:limit]


def exception_detail(e: BaseException) -> str:
    return clean_text(f"{type(e).__name__}: {e}")


@dataclass(frozen=True)
class RowError:
    code: str
    detail: str
    shard: str | None = None

    def __post_init__(self):
        if not _CODE.match(self.code):
            raise ValueError(f"row error code must be snake_case, got {self.code!r}")

    def __str__(self) -> str:  # for log lines; never parsed
        return f"{self.code}: {self.detail}" + (f" [{self.shard}]" if self.shard else "")


def row_error(code: str, detail: object = None, shard: str | None = None) -> RowError:
    """A RowError with a cleaned detail; without one, the code's description stands in."""
    text = clean_text(detail) if detail is not None else ""
    return RowError(code, text or CODES.get(code, code.replace("_", " ")), shard)


def parse_legacy(text: str, shard: str | None = None) -> RowError:
    """An old `reason (detail) [shard]` string -> RowError (reason words become the code)."""
    m = _LEGACY.match(text)
    reason = (m["reason"] if m else text).strip().lower()
    code = _LEGACY_CODES.get(reason) or re.sub(r"[^a-z0-9]+", "_", reason).strip("_") or "error"
    if not code[0].isalpha():
        code = f"error_{code}"
    detail = m["detail"] if m and m["detail"] else (None if code in CODES else reason)
    return row_error(code, detail, (m["shard"] if m else None) or shard)


def _values(col) -> list:
    return col.to_pylist() if hasattr(col, "to_pylist") else list(col)


def _column(rows, name: str):
    if isinstance(rows, (pa.Table, pa.RecordBatch)):
        return rows.column(name) if name in rows.column_names else None
    return rows.get(name)


def errors_from(rows: pa.Table | pa.RecordBatch | Mapping[str, Sequence]) -> list[RowError | None]:
    """Each row's RowError or None, from an Arrow table or a dict of columns (a Ray numpy batch): `error_code` +
    `error`, or the legacy `error` string alone; neither column: every row is fine."""
    codes, details, shards = (_column(rows, n) for n in ("error_code", "error", "shard"))
    if codes is None and details is None:
        n = rows.num_rows if isinstance(rows, (pa.Table, pa.RecordBatch)) else len(next(iter(rows.values()), ()))
        return [None] * n
    n = len(codes if codes is not None else details)
    shards = _values(shards) if shards is not None else [None] * n
    if codes is None:
        return [None if d is None else parse_legacy(str(d), s) for d, s in zip(_values(details), shards)]
    details = _values(details) if details is not None else [None] * n
    return [None if c is None else RowError(str(c), str(d) if d is not None else row_error(str(c)).detail, s)
            for c, d, s in zip(_values(codes), details, shards)]


def codes_of(rows) -> list[str | None]:
    return [None if e is None else e.code for e in errors_from(rows)]


def error_columns(errors: Sequence[RowError | None]) -> dict[str, pa.Array]:
    """The `error_code` and `error` columns for these rows."""
    return {"error_code": pa.array([None if e is None else e.code for e in errors], pa.string()),
            "error": pa.array([None if e is None else e.detail for e in errors], pa.string())}


def count_codes(codes: Iterable[str | None]) -> tuple[int, dict[str, int]]:
    """(usable rows, {code: rows}) with codes sorted."""
    ok, counts = 0, {}
    for c in codes:
        if c is None:
            ok += 1
        else:
            counts[c] = counts.get(c, 0) + 1
    return ok, dict(sorted(counts.items()))
