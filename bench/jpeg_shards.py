"""Photo-like JPEG fixtures in webdataset tar shards, shared by the recaption, data and vLLM benches."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def synth_jpegs(n: int, px: int, seed: int = 0) -> list[bytes]:
    """`n` photo-like JPEGs of px x 0.75 px: smooth gradients + noise (photo-like JPEG sizes)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:px, 0:int(px * 0.75)]
    out = []
    for _ in range(n):
        c = rng.uniform(0, 1, 6)
        img = np.stack([(c[k] * yy + c[k + 3] * xx) % 256 for k in range(3)], -1)
        img = (img + rng.normal(0, 12, img.shape)).clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_shards(d: Path, images: list[bytes], shards: int) -> list[str]:
    """`images` split in order over `shards` tars (keys and captions by image index, whatever the split)."""
    d.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, len(images), shards + 1).astype(int)
    paths = []
    for s in range(shards):
        path = d / f"{s:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(bounds[s], bounds[s + 1]):
                for ext, data in (("jpg", images[i]), ("txt", f"image {i}".encode())):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths


def make_shards(d: Path, shards: int, per_shard: int, px: int) -> list[str]:
    return write_shards(d, synth_jpegs(shards * per_shard, px), shards)
