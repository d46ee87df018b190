"""A learnable toy for pretrain tests: coloured shapes in webdataset tars + recaption-style Parquet files."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw
from shard_files import write_tar

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}
SHAPES = ("circle", "square")
RECAP_SCHEMA = pa.schema([("key", pa.string()), ("caption", pa.string()), ("syn_captions", pa.list_(pa.string())),
                          ("error", pa.string())])


def shape_jpeg(colour: str, shape: str, rng: np.random.Generator, size: int = 48) -> bytes:
    im = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(100, 160, 3)))
    d = ImageDraw.Draw(im)
    r = int(rng.integers(size // 4, size // 3))
    cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
    box = (cx - r, cy - r, cx + r, cy + r)
    (d.ellipse if shape == "circle" else d.rectangle)(box, fill=COLOURS[colour])
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_world(root: Path, n_shards: int = 2, per_shard: int = 48, seed: int = 0, bad: bool = False) -> dict:
    """`root/shards/0000k.tar` + `root/recap/0000k.parquet`. With `bad`: one recaption row with an error, one key
    missing from the recaptions, one undecodable image. Returns paths and the expected bad counts."""
    rng = np.random.default_rng(seed)
    (root / "shards").mkdir(parents=True, exist_ok=True)
    (root / "recap").mkdir(parents=True, exist_ok=True)
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    for k in range(n_shards):
        samples, recap = [], []
        for i in range(per_shard):
            colour, shape = combos[int(rng.integers(len(combos)))]
            key = f"{k:05d}{i:04d}"
            samples.append({"key": key, "jpg": shape_jpeg(colour, shape, rng),
                            "txt": f"{colour} {shape}" if i % 3 else f"photo {key}"})  # noisy alt text
            recap.append({"key": key, "caption": samples[-1]["txt"], "error": None,
                          "syn_captions": [f"a {colour} {shape}", f"{shape} that is {colour}", f"{colour} {shape}"]})
        if bad and k == 0:
            recap[1] = {**recap[1], "syn_captions": None, "error": "engine failed"}
            recap.pop(2)                                   # key 00000 0002 has no recaption row
            samples[3]["jpg"] = b"\xff\xd8 not a jpeg"     # undecodable (caught by read_shards' header check)
        write_tar(root / "shards" / f"{k:05d}.tar", samples)
        pq.write_table(pa.Table.from_pylist(recap, schema=RECAP_SCHEMA), root / "recap" / f"{k:05d}.parquet")
    return {"shards": str(root / "shards"), "recaptions": str(root / "recap"), "rows": n_shards * per_shard}
