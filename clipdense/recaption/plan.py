"""Which input shards are done: each input shard's output file `<output>/<shard name>.parquet` (data/naming.py),
and whether it exists already and is ours. Re-runs skip done shards."""
from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from clipdense.config import DataError
from clipdense.data.naming import output_path
from clipdense.data.storage import Storage


@dataclass
class Plan:
    inputs: dict[str, str]            # shard name -> input URI (every input, in order)
    outputs: dict[str, Storage]       # shard name -> its output file
    done: list[str]                   # names whose output file already exists
    todo: dict[str, str] = field(init=False)  # the inputs not done (computed once: the writer asks per block)

    def __post_init__(self):
        done = set(self.done)
        self.todo = {n: p for n, p in self.inputs.items() if n not in done}


def _folder(path: str) -> str:
    """A directory as one comparable string: `s3://b/x/` -> `s3://b/x`, a local path made absolute."""
    return path.rstrip("/") if path.startswith("s3://") else os.path.abspath(path)


def check_output_apart(inputs: list[str], output: str) -> None:
    """Outputs never go into a folder that holds input shards: `<output>/NNNNN.parquet` would overwrite
    img2dataset's per-URL metadata beside `NNNNN.tar` (or a Parquet shard), and a rerun would read outputs as
    inputs. Any output path equal to an input file is such a case, since outputs lie directly in `output`."""
    out = _folder(output)
    if any(posixpath.dirname(_folder(p)) == out for p in inputs):
        raise DataError(f"output {output!r} is the folder of the input shards: outputs there would overwrite or be "
                        "read as inputs (img2dataset's NNNNN.parquet is its metadata); choose another output folder")


def is_output_file(file: Storage) -> bool:
    """Whether a Parquet file has our output schema (key + syn_captions), not, say, img2dataset's metadata."""
    try:
        with file.open_input_file() as f:
            names = set(pq.read_schema(f).names)
    except (OSError, ValueError):
        return False
    return {"key", "syn_captions"} <= names


def plan_shards(inputs: list[tuple[str, str]], output: Storage, with_tar: bool = False) -> Plan:
    """Which of the input shards ((name, URI) pairs: `ShardFiles.names` beside `.files`) still need their output
    file in `output` (`with_tar`: teachers are on, so a shard is done when its DataCompDR `<shard>.tar` is there
    too; the writer writes it before the Parquet)."""
    check_output_apart([path for _, path in inputs], output.uri)
    names: dict[str, str] = {}
    for name, path in inputs:
        if name in names:
            raise DataError(f"input shards {names[name]!r} and {path!r} would both write {name}.parquet "
                            "(give each shard a distinct file name)")
        names[name] = path
    present = output.file_names()
    outputs = {n: output.at(output_path(output.uri, n)) for n in names}
    done = [n for n in names if f"{n}.parquet" in present and (not with_tar or f"{n}.tar" in present)]
    # A file at an output path is taken as done only if it is ours. Its schema is read where the folder looks like
    # img2dataset's (a tar or _stats.json beside it) and for the first done file (a folder of someone else's
    # Parquet): one footer each, not one per done shard of a large rerun.
    suspects = [n for n in done if f"{n}.tar" in present or f"{n}_stats.json" in present] + done[:1]
    for n in dict.fromkeys(suspects):
        if not is_output_file(outputs[n]):
            raise DataError(f"output folder {output.uri!r} holds {n}.parquet that is not a recaption output (no key + "
                            "syn_captions columns; img2dataset metadata?): writing there would overwrite it; choose "
                            "another output folder")
    return Plan(inputs=names, outputs=outputs, done=done)
