"""Writers of the real dataset layouts users bring, byte for byte in their formats, for tests and smoke runs.

- img2dataset (`--output_format webdataset`): `NNNNN.tar` (KEY.jpg, KEY.txt (an empty caption: an empty .txt),
  KEY.json with url, key, status, error_message, sizes, sha256 (of the downloaded bytes), exif + any
  `save_additional_columns` such as DataComp's uid), `NNNNN.parquet` with one row per input URL (failed downloads
  too, absent from the tar) and `NNNNN_stats.json`. Keys: the shard id (5 digits) + the index in the shard (4).
- DataCompDR (apple/DataCompDR-12M): per sample KEY.url.txt, KEY.syn.json = {"syn_text": [captions]},
  KEY.paug.json = {"param_aug": "<json string>"}, KEY.npz (numpy.savez: image_emb per stored augmentation,
  text_emb for the real + synthetic captions), KEY.json = {"uid", "sha256"}; no images.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

IMG2DATASET_PARQUET = pa.schema([
    ("url", pa.string()), ("key", pa.string()), ("caption", pa.string()), ("status", pa.string()),
    ("error_message", pa.string()), ("width", pa.int64()), ("height", pa.int64()),
    ("original_width", pa.int64()), ("original_height", pa.int64()), ("exif", pa.string()), ("sha256", pa.string()),
])


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A tar with fixed metadata (mtime 0, root owner, 0644) so equal members give equal bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def img2dataset_shard(folder: str | Path, shard_id: int, samples: list[dict]) -> dict:
    """Write one img2dataset shard. samples: {"url", "caption" (str | None), "jpg": bytes | None, "size": (w, h),
    "status" ("success" when jpg is given, else e.g. "failed_to_download"), "error_message", **extra columns}.
    Returns {"tar", "parquet", "stats", "keys": every key in order, "failed": {status: count}}."""
    folder = Path(folder)
    members, records, failed = [], [], {}
    extra = sorted({k for s in samples for k in s} - {"url", "caption", "jpg", "size", "status", "error_message"})
    for i, s in enumerate(samples):
        key = f"{shard_id:05d}{i:04d}"
        ok = s.get("jpg") is not None
        status = s.get("status") or ("success" if ok else "failed_to_download")
        w, h = s.get("size") or ((None, None) if not ok else (0, 0))
        rec = {"url": s.get("url") or f"https://example.com/{key}.jpg", "key": key, "caption": s.get("caption"),
               "status": status, "error_message": s.get("error_message") if not ok else None,
               "width": w if ok else None, "height": h if ok else None,
               "original_width": w if ok else None, "original_height": h if ok else None,
               "exif": "{}" if ok else None, "sha256": hashlib.sha256(s["jpg"]).hexdigest() if ok else None,
               **{k: s.get(k) for k in extra}}
        records.append(rec)
        if not ok:
            failed[status] = failed.get(status, 0) + 1
            continue
        members += [(f"{key}.jpg", s["jpg"]), (f"{key}.txt", (s.get("caption") or "").encode()),
                    (f"{key}.json", json.dumps(rec).encode())]
    tar = folder / f"{shard_id:05d}.tar"
    atomic_write(tar, tar_bytes(members))
    schema = IMG2DATASET_PARQUET
    for k in extra:
        schema = schema.append(pa.field(k, pa.string()))
    parquet = folder / f"{shard_id:05d}.parquet"
    table = pa.Table.from_pylist([{**r, **{k: None if r[k] is None else str(r[k]) for k in extra}} for r in records],
                                 schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write(parquet, buf.getvalue())
    n_ok = len(samples) - sum(failed.values())
    stats = {"count": len(samples), "successes": n_ok, "failed_to_download": failed.get("failed_to_download", 0),
             "failed_to_resize": failed.get("failed_to_resize", 0), "duration": 0.0, "start_time": 0.0,
             "end_time": 0.0, "status_dict": {"success": n_ok, **failed}}
    atomic_write(folder / f"{shard_id:05d}_stats.json", json.dumps(stats, indent=4).encode())
    return {"tar": str(tar), "parquet": str(parquet), "stats": str(folder / f"{shard_id:05d}_stats.json"),
            "keys": [r["key"] for r in records], "failed": failed}


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def datacompdr_members(s: dict) -> list[tuple[str, bytes]]:
    """One sample's tar members. `npz` (bytes, already `npz_bytes(image_emb=..., text_emb=...)` in float16) may
    stand for image_emb + text_emb; `syn_score` (a list beside syn_text) is clipdense's stated extension."""
    k = s["key"]
    syn = {"syn_text": list(s["syn_text"])}
    if s.get("syn_score") is not None:
        syn["syn_score"] = [float(x) for x in s["syn_score"]]
    npz = s.get("npz")
    if npz is None:
        npz = npz_bytes(image_emb=np.asarray(s["image_emb"], np.float16),
                        text_emb=np.asarray(s["text_emb"], np.float16))
    return [(f"{k}.url.txt", s.get("url", "").encode()),
            (f"{k}.syn.json", json.dumps(syn).encode()),
            (f"{k}.paug.json", json.dumps({"param_aug": json.dumps(s.get("param_aug", {}))}).encode()),
            (f"{k}.npz", npz),
            (f"{k}.json", json.dumps({"uid": s["uid"], "sha256": s["sha256"]}).encode())]


def datacompdr_tar(samples: list[dict]) -> bytes:
    """One DataCompDR shard's bytes (see datacompdr_shard)."""
    return tar_bytes([m for s in samples for m in datacompdr_members(s)])


def datacompdr_shard(path: str | Path, samples: list[dict]) -> str:
    """Write one DataCompDR shard. samples: {"key", "uid", "sha256", "url", "syn_text": [str], "param_aug": dict
    (serialised to a JSON string, as DataCompDR stores it), "image_emb": (A, D), "text_emb": (T, D)}."""
    atomic_write(Path(path), datacompdr_tar(samples))
    return str(path)
