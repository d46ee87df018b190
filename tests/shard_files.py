"""Small real webdataset tars and Parquet files for tests, including broken ones."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
from PIL import Image


def jpeg_bytes(seed: int, size: int = 32) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def write_tar(path, samples: list[dict]) -> None:
    """samples: {"key": str, "jpg": bytes | None, "txt": str | None, "json": dict | None, **other_ext: bytes}."""
    with tarfile.open(path, "w") as tar:
        for s in samples:
            for ext, value in s.items():
                if ext == "key" or value is None:
                    continue
                data = value if isinstance(value, bytes) else (
                    json.dumps(value).encode() if isinstance(value, (dict, list)) else str(value).encode())
                info = tarfile.TarInfo(f"{s['key']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def good_samples(prefix: str, n: int, seed: int = 0) -> list[dict]:
    return [{"key": f"{prefix}{i:04d}", "jpg": jpeg_bytes(seed * 1000 + i), "txt": f"caption {prefix}{i}",
             "json": {"i": i}} for i in range(n)]


def write_shard_set(d, n_shards: int, per_shard: int, digits: int = 6) -> dict[str, list[str]]:
    """`n_shards` tars of good samples in folder `d` (made here); {the Parquet each becomes: its keys, in order}."""
    d.mkdir(parents=True, exist_ok=True)
    keys = {}
    for s in range(n_shards):
        samples = good_samples(f"s{s}_", per_shard, seed=s)
        write_tar(d / f"{s:0{digits}d}.tar", samples)
        keys[f"{s:0{digits}d}.parquet"] = [x["key"] for x in samples]
    return keys
