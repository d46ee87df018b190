"""Input path specs: local paths, directories, globs, brace ranges (`{000000..000099}.tar`) and s3:// URIs."""
from __future__ import annotations

import fnmatch
import glob
import os
import re
from typing import Iterable

import pyarrow.fs as pafs

from clipdense.config import DataError

_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_LIST = re.compile(r"\{([^{}]*,[^{}]*)\}")


def expand_braces(spec: str) -> list[str]:
    """`a{00..02}.tar` -> a00.tar a01.tar a02.tar (zero padding kept); `{a,b}` lists too; leftmost brace first."""
    found = [m for m in (_RANGE.search(spec), _LIST.search(spec)) if m]
    if not found:
        return [spec]
    m = min(found, key=lambda m: m.start())
    head, tail = spec[: m.start()], spec[m.end():]
    if m.re is _RANGE:
        lo, hi = m.group(1), m.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        alts = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        alts = m.group(1).split(",")
    return [s for alt in alts for s in expand_braces(head + alt + tail)]


def filesystem_for(uri: str, s3_endpoint: str | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path-within-it). `s3_endpoint` (or env AWS_ENDPOINT_URL) points at an S3-compatible server."""
    if uri.startswith("s3://"):
        endpoint = s3_endpoint or os.environ.get("AWS_ENDPOINT_URL")
        kwargs = {}
        if endpoint:
            scheme, _, host = endpoint.rpartition("://")
            kwargs = {"endpoint_override": host or endpoint, "scheme": scheme or "http"}
        if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
            # explicit keys travel with the pickled filesystem to Ray workers whose env may lack them
            kwargs["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
            kwargs["secret_key"] = os.environ["AWS_SECRET_ACCESS_KEY"]
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        if region:
            kwargs["region"] = region
        return pafs.S3FileSystem(**kwargs), uri[len("s3://"):]
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def _has_magic(s: str) -> bool:
    return any(c in s for c in "*?[")


def _expand_one(spec: str, suffixes: tuple[str, ...], s3_endpoint: str | None) -> list[str]:
    fs, path = filesystem_for(spec, s3_endpoint)
    prefix = "s3://" if spec.startswith("s3://") else ""
    if isinstance(fs, pafs.LocalFileSystem):
        if _has_magic(path):
            return sorted(glob.glob(path))
        if os.path.isdir(path):
            return sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(suffixes))
        return [path] if os.path.isfile(path) else []
    if _has_magic(path):
        base = path[: min(path.find(c) for c in "*?[" if c in path)].rsplit("/", 1)[0]
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        return sorted(prefix + i.path for i in infos if i.is_file and fnmatch.fnmatch(i.path, path))
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
        return sorted(prefix + i.path for i in infos if i.is_file and i.path.endswith(suffixes))
    return [prefix + path] if info.type == pafs.FileType.File else []


def expand_paths(specs: str | Iterable[str], suffixes: tuple[str, ...] = (".tar", ".parquet"),
                 s3_endpoint: str | None = None) -> list[str]:
    """Every input file the specs name, in order, de-duplicated. A spec that matches nothing is an error."""
    if isinstance(specs, str):
        specs = [specs]
    out: list[str] = []
    seen: set[str] = set()  # a list scan per file would make a long shard list quadratic
    for spec in specs:
        for one in expand_braces(str(spec)):
            found = _expand_one(one, suffixes, s3_endpoint)
            if not found:
                raise DataError(f"no input files match {one!r}")
            for f in found:
                if f not in seen:
                    seen.add(f)
                    out.append(f)
    return out


# img2dataset writes `NNNNN.parquet` beside `NNNNN.tar`: one row per input URL (key, url, caption, status,
# error_message, sizes, sha256, ...) and no image bytes. It is the tar's metadata, not a second shard.
SIDECAR_COLUMNS = frozenset({"key", "status"})
IMAGE_COLUMNS = frozenset({"image_bytes", "image", "jpg", "png", "webp"})


def _is_sidecar(fs: pafs.FileSystem, inner: str) -> bool:
    import pyarrow.parquet as pq

    try:
        with fs.open_input_file(inner) as f:
            names = set(pq.read_schema(f).names)
    except (OSError, ValueError):  # unreadable: not ours to judge here, the reader reports it
        return False
    return SIDECAR_COLUMNS <= names and not names & IMAGE_COLUMNS


def expand_shards(specs: str | Iterable[str], s3_endpoint: str | None = None) -> tuple[list[str], dict[str, str]]:
    """(shards, {tar: its img2dataset sidecar parquet}). A sidecar is found beside each tar whether or not the specs
    name it (a `*.tar` glob over an img2dataset folder still accounts for its failed downloads); a named sidecar is
    not a shard of its own."""
    files = expand_paths(specs, s3_endpoint=s3_endpoint)
    tars = [f for f in files if f.endswith(".tar")]
    if not tars:
        return files, {}
    fs, _ = filesystem_for(tars[0], s3_endpoint)
    candidates = {t: t[: -len(".tar")] + ".parquet" for t in tars}
    inner = {t: c[len("s3://"):] if c.startswith("s3://") else c for t, c in candidates.items()}
    infos = fs.get_file_info(list(inner.values()))
    sidecars = {t: candidates[t] for t, info in zip(tars, infos)
                if info.type == pafs.FileType.File and _is_sidecar(fs, inner[t])}
    taken = set(sidecars.values())
    return [f for f in files if f not in taken], sidecars
