"""Input path specs: local paths, directories, globs, brace ranges (`{000000..000099}.tar`) and s3:// URIs.

A spec is a `Storage` (data/storage.py: the URI and the endpoint that reaches it); the listing functions take one
or several and return file URIs on that same storage:
- `expand_paths(source, suffixes) -> list[str]`: every file the specs name, in order;
- `expand_shards(source) -> ShardFiles`: the shards, each tar's img2dataset sidecar, and the `Storage` that reaches
  them, listed once and handed as is to `data.shards.read_shards`.
"""
from __future__ import annotations

import fnmatch
import glob
import os
import re
from dataclasses import dataclass, field
from typing import Iterable

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from clipdense.config import DataError
from clipdense.data.naming import shard_name
from clipdense.data.storage import Storage

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


def _has_magic(s: str) -> bool:
    return any(c in s for c in "*?[")


def _expand_one(spec: Storage, suffixes: tuple[str, ...]) -> list[str]:
    fs, path = spec.fs, spec.path
    prefix = "s3://" if spec.remote else ""
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


def _sources(source: Storage | Iterable[Storage]) -> list[Storage]:
    return [source] if isinstance(source, Storage) else list(source)


def expand_paths(source: Storage | Iterable[Storage], suffixes: tuple[str, ...] = (".tar", ".parquet")) -> list[str]:
    """Every input file the specs name, in order, de-duplicated. A spec that matches nothing is an error."""
    out: list[str] = []
    seen: set[str] = set()  # a list scan per file would make a long shard list quadratic
    for spec in _sources(source):
        for one in expand_braces(str(spec.uri)):
            found = _expand_one(spec.at(one), suffixes)
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
    try:
        with fs.open_input_file(inner) as f:
            names = set(pq.read_schema(f).names)
    except (OSError, ValueError):  # unreadable: not ours to judge here, the reader reports it
        return False
    return SIDECAR_COLUMNS <= names and not names & IMAGE_COLUMNS


@dataclass(frozen=True)
class ShardFiles:
    """Input shards as listed once: their URIs in order, each tar's img2dataset sidecar parquet, and the storage
    (endpoint) that reaches them."""
    files: list[str]
    sidecars: dict[str, str]
    storage: Storage

    names: list[str] = field(init=False)   # each shard's output stem (data/naming.py), in order

    def __post_init__(self):
        object.__setattr__(self, "names", [shard_name(f) for f in self.files])


def expand_shards(source: Storage | Iterable[Storage]) -> ShardFiles:
    """The shards the specs name and their sidecars. A sidecar is found beside each tar whether or not the specs
    name it (a `*.tar` glob over an img2dataset folder still accounts for its failed downloads); a named sidecar is
    not a shard of its own. All specs are reached through the first one's endpoint."""
    sources = _sources(source)
    storage = sources[0]
    files = expand_paths(sources)
    tars = [f for f in files if f.endswith(".tar")]
    if not tars:
        return ShardFiles(files, {}, storage)
    fs = storage.at(tars[0]).fs
    candidates = {t: t[: -len(".tar")] + ".parquet" for t in tars}
    inner = {t: c[len("s3://"):] if c.startswith("s3://") else c for t, c in candidates.items()}
    infos = fs.get_file_info(list(inner.values()))
    sidecars = {t: candidates[t] for t, info in zip(tars, infos)
                if info.type == pafs.FileType.File and _is_sidecar(fs, inner[t])}
    taken = set(sidecars.values())
    return ShardFiles([f for f in files if f not in taken], sidecars, storage)
