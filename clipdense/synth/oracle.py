"""The oracle's captions: the world's true descriptions of each web image, written as a recaptions folder (one
`<shard>.parquet` of `key`, `caption` (the alt text), `syn_captions` per web shard), so `oracle-clip` pretrains on
them through the same join as the recaptions. N captions per image, as the recaptioner gives: the same true
sentence with its objects in N different orders (the first nearest first), so the oracle differs from the
recaptions only in accuracy, not in the number of texts per image."""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipdense.data.shards import read_shard_local
from clipdense.data.storage import Storage
from clipdense.synth.captions import overlaps, position_phrase
from clipdense.synth.scene import Obj


def _objects(scene: dict) -> list[Obj]:
    fields = Obj.__dataclass_fields__
    return [Obj(**{k: (tuple(v) if k == "rgb" else v) for k, v in o.items() if k in fields})
            for o in scene.get("objects", [])]


def _sentence(order: list[Obj]) -> str:
    parts = []
    for o in order:
        s = f"a {o.size} {o.colour} {o.shape} {position_phrase(o)}"
        behind = [f"the {b.colour} {b.shape}" for b in sorted(order, key=lambda b: b.depth)
                  if b.depth > o.depth and overlaps(o, b)]
        if behind:
            s += " in front of " + " and ".join(behind)
        parts.append(s)
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text[0].upper() + text[1:] + "."


def oracle_captions(scene: dict, n: int, key: str, seed: int) -> list[str]:
    """`n` true descriptions of `scene` (a scene's metadata dict): nearest first, then seeded object orders."""
    objs = sorted(_objects(scene), key=lambda o: o.depth)
    if not objs:
        return [""] * n
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    orders = [objs] + [[objs[i] for i in rng.permutation(len(objs))] for _ in range(n - 1)]
    return [_sentence(order) for order in orders]


def write_oracle_captions(web_dir: Path, out_dir: Path, n: int, seed: int) -> int:
    """One recaptions Parquet per web shard in `out_dir`; returns the rows written (every row of every shard: a
    row without scene metadata gets empty captions, which the pretraining join counts as unusable)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = 0
    for tar in sorted(web_dir.glob("*.tar")):
        keys, alts, captions = [], [], []
        for r in read_shard_local(Storage(str(tar)), validate="none"):
            scene = json.loads(r["meta"]).get("scene", {}) if r["meta"] else {}
            keys.append(r["key"])
            alts.append(r["caption"])
            captions.append(oracle_captions(scene, n, r["key"], seed))
        table = pa.table({"key": pa.array(keys, pa.string()),
                          "caption": pa.array(alts, pa.string()),   # the web's own text, as in a recaptions file
                          "syn_captions": pa.array(captions, pa.list_(pa.string()))})
        pq.write_table(table, out_dir / f"{tar.stem}.parquet")
        rows += len(keys)
    return rows
