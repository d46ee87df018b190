"""Per-shard outputs: the driver-side assembler that writes one Parquet file per input shard as soon as that shard's
rows are complete, and the output schema.

The pipeline runs with Ray Data's `preserve_order`, so result blocks arrive in input order: when rows of the next
shard appear, the previous shard is complete and is written (atomically: temp name, then rename). A shard is done
when its output file exists (plan.py); re-runs skip done shards, so each input row lands in exactly one output file.
"""
from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc

from clipdense.data.layouts import datacompdr_tar
from clipdense.data.naming import shard_name
from clipdense.data.rows import ERROR_FIELDS, codes_of, count_codes
from clipdense.data.storage import Storage
from clipdense.recaption.plan import Plan

OUTPUT_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("caption", pa.string()),
    ("syn_captions", pa.list_(pa.string())),
    ("engine", pa.string()),
    ("model", pa.string()),
    ("prompt", pa.string()),
    ("sampling", pa.string()),  # JSON of the sampling parameters
    *ERROR_FIELDS,              # error_code + error (detail); outputs of older versions have `error` alone
    ("weights", pa.string()),   # revision:<tag> or sha256:<checkpoint file or weights folder>; none: echo, random
    ("syn_seeds", pa.list_(pa.int64())),  # each caption's sampling seed (engine seed, key, caption index)
])
IMAGE_FIELD = pa.field("image_bytes", pa.binary())
# With teachers: each caption's CLIP score (cosine of the scorer teacher's image and caption embeddings)
SCORE_FIELDS = [pa.field("caption_score", pa.float32()), pa.field("syn_scores", pa.list_(pa.float32()))]


class InjectedFault(RuntimeError):
    """Raised by fault injection (config `fault.*`) to simulate a crash."""


@dataclass
class RunCounts:
    rows: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def add(self, table: pa.Table) -> None:
        ok, errors = count_codes(codes_of(table))
        self.rows += table.num_rows
        self.ok += ok
        for code, n in errors.items():
            self.errors[code] = self.errors.get(code, 0) + n

    @property
    def failed(self) -> int:
        return self.rows - self.ok


def tar_of(parquet: Storage) -> Storage:
    """The DataCompDR tar beside a shard's Parquet output: `<output>/<shard>.tar`."""
    return parquet.at(posixpath.splitext(parquet.uri)[0] + ".tar")


def write_bytes(data: bytes, dest: Storage) -> None:
    """Write one file atomically: temp name then rename locally; an object-store PUT is atomic already."""
    if dest.remote:
        with dest.open_output_stream() as f:
            f.write(data)
        return
    tmp = dest.at(posixpath.join(posixpath.dirname(dest.uri), f".tmp-{posixpath.basename(dest.uri)}"))
    with tmp.open_output_stream() as f:
        f.write(data)
    dest.fs.move(tmp.path, dest.path)


def dr_samples(parts: list[pa.Table]) -> list[dict]:
    """DataCompDR samples (data/layouts.py) of a shard's rows that the teachers embedded; rows in error have no
    embeddings and stay in the Parquet alone."""
    samples = []
    for part in parts:
        cols = part.select(["key", "syn_captions", "uid", "sha256", "param_aug", "teacher_npz",
                            "syn_scores"]).to_pydict()
        for i, npz in enumerate(cols["teacher_npz"]):
            if npz is None:
                continue
            samples.append({"key": cols["key"][i], "uid": cols["uid"][i], "sha256": cols["sha256"][i],
                            "syn_text": cols["syn_captions"][i], "param_aug": json.loads(cols["param_aug"][i]),
                            "npz": npz, "syn_score": cols["syn_scores"][i]})
    return samples


def shard_runs(block: pa.Table) -> list[tuple[str, pa.Table]]:
    """(shard, rows) for each run of consecutive rows from one shard, in order (zero-copy slices). A block holds a
    run of whole shards and parts of its first and last (blocks span shard boundaries, data.shards.rebatch)."""
    col = block.column("shard")
    if block.num_rows == 0:
        return []
    first, last = col[0].as_py(), col[-1].as_py()
    if first == last and pc.all(pc.equal(col, first)).as_py():
        return [(first, block)]
    values = col.to_pylist()
    runs, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            runs.append((values[start], block.slice(start, i - start)))
            start = i
    return runs


class ShardAssembler:
    """Receives result blocks in input order; writes each shard's rows as one Parquet file once complete.

    Order holds per source: read_shards unions tar and Parquet readers, and with preserve_order Ray's union
    interleaves their blocks round-robin, so each source (file type) has its own current shard."""

    def __init__(self, plan: Plan, provenance: dict[str, str | None], write: Callable[[pa.Table, Storage], None],
                 keep_images: bool = False, fail_after_shards: int | None = None,
                 write_tar: Callable[[bytes, Storage], None] | None = None,
                 seeds: Callable[[str], list[int] | None] | None = None):
        self.plan, self.provenance, self.write, self.write_tar = plan, provenance, write, write_tar
        self.seeds = seeds
        fields = [*OUTPUT_SCHEMA, *(SCORE_FIELDS if write_tar is not None else []), *([IMAGE_FIELD] * keep_images)]
        self.schema = pa.schema(fields)
        self.fail_after_shards = fail_after_shards
        self.current: dict[str, str] = {}           # source -> shard name being collected
        self.parts: dict[str, list[pa.Table]] = {}  # shard name -> its result blocks so far
        self.written: list[str] = []
        self._written: set[str] = set()
        self.counts = RunCounts()

    def add(self, block: pa.Table) -> None:
        if block.num_rows == 0:
            return
        for value, part in shard_runs(block):
            name = shard_name(value)
            if name not in self.plan.todo:
                raise RuntimeError(f"rows from unexpected shard {value!r}")
            if name in self._written:
                raise RuntimeError(f"rows of shard {name!r} arrived after it was written (input order lost)")
            source = posixpath.splitext(value)[1]
            if self.current.get(source) not in (None, name):
                self._flush(self.current[source])
            self.current[source] = name
            self.parts.setdefault(name, []).append(part)

    def _flush(self, name: str) -> None:
        parts = self.parts.pop(name, [])
        table = self._output_table(parts)
        if self.write_tar is not None:  # before the Parquet, which marks the shard done (plan.py)
            self.write_tar(datacompdr_tar(dr_samples(parts)), tar_of(self.plan.outputs[name]))
        self.write(table, self.plan.outputs[name])
        self.counts.add(table)
        self.written.append(name)
        self._written.add(name)
        if self.fail_after_shards is not None and len(self.written) >= self.fail_after_shards:
            raise InjectedFault(f"fault injection: stopping after {len(self.written)} shard file(s)")

    def finish(self) -> None:
        """Flush the open shards; shards that produced no rows at all get an empty output file."""
        for name in list(self.current.values()):
            self._flush(name)
        self.current = {}
        for name in self.plan.todo:
            if name not in self._written:
                self._flush(name)

    def _seeds(self, data: pa.Table) -> list[list[int] | None]:
        """Each captioned row's caption seeds; after a rerank, those of the kept candidates (`syn_kept`)."""
        syn, keys = data.column("syn_captions").to_pylist(), data.column("key").to_pylist()
        kept = data.column("syn_kept").to_pylist() if "syn_kept" in data.column_names else [None] * len(keys)
        out = []
        for k, s, idx in zip(keys, syn, kept):
            seeds = self.seeds(k) if s is not None and self.seeds else None
            out.append([seeds[j] for j in idx] if seeds is not None and idx is not None else seeds)
        return out

    def _output_table(self, parts: list[pa.Table]) -> pa.Table:
        data = pa.concat_tables(parts) if parts else None
        n = data.num_rows if data is not None else 0
        cols = {}
        for f in self.schema:
            if f.name in self.provenance or f.name == "weights":  # weights: unknown to an assembler not told
                cols[f.name] = pa.array([self.provenance.get(f.name)] * n, f.type)
            elif f.name == "syn_seeds" and data is not None:
                cols[f.name] = pa.array(self._seeds(data), f.type)
            elif data is not None:
                cols[f.name] = data.column(f.name).cast(f.type)
            else:
                cols[f.name] = pa.array([], f.type)
        return pa.table(cols, schema=self.schema)
