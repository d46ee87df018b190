"""How shards and their per-shard outputs are named: the contract between recaption (writes `<stem>.parquet`)
and pretrain (joins an input shard to the recaption file of the same stem)."""
from __future__ import annotations

import posixpath


def shard_name(path: str) -> str:
    """`s3://b/web/00012.tar` -> `00012`: the output file stem for an input shard."""
    base = posixpath.basename(path.rstrip("/"))
    return base.rsplit(".", 1)[0] if "." in base else base


def output_path(output: str, name: str) -> str:
    """The per-shard output file `<output>/<name>.parquet`."""
    return f"{output.rstrip('/')}/{name}.parquet"
