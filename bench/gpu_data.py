"""GPU bench, data mode (`python -m bench.gpu`, part `data`): real JPEGs through the pretraining collate into a
training step, decoded (a) on the CPU as `data.decode_on: cpu` does (whole image, JPEG draft, on a pool of decode
threads standing in for Ray Data's decode tasks, then the collate's crop) or (b) on the GPU as `data.decode_on: gpu`
does (encoded bytes, torchvision's batched nvJPEG decode + crop in the collate, pretrain/gpu_decode.py). Each path
runs in a prefetch thread as Ray Data's `iter_torch_batches` runs the collate; the loop reports images/s and the
fraction of step time spent waiting for the next batch. No Ray here (the GPU box has none).
"""
from __future__ import annotations

import io
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from bench.common import row
from bench.geometry import model_geometry
from clipdense.data.images import crop_source_side, decode_crop_source
from clipdense.models import create_clip
from clipdense.pretrain.batches import CROP_SCALE, Collate
from clipdense.pretrain.losses import build_loss


def make_jpegs(n: int, sizes: list[tuple[int, int]], seed: int = 0) -> list[bytes]:
    """`n` photo-like JPEGs (gradients, texture, noise; quality 90), cycling through `sizes` (w, h)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        img = np.stack([(rng.uniform(0.1, 0.5) * yy + rng.uniform(0.1, 0.5) * xx) % 200 for _ in range(3)], -1)
        img += (40 * np.sin(xx / rng.uniform(4, 12)) * np.cos(yy / rng.uniform(4, 12)))[..., None]
        img += rng.normal(0, 8, img.shape).astype(np.float32)
        buf = io.BytesIO()
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _prefetched(make_batch, steps: int, depth: int = 2):
    """Batches 0..steps-1 built in one background thread, `depth` ahead (as Ray Data's prefetch_batches)."""
    q: queue.Queue = queue.Queue(depth)

    def fill():
        try:
            for i in range(steps):
                q.put(make_batch(i))
        except BaseException as e:  # surfaces in the consumer
            q.put(e)

    threading.Thread(target=fill, daemon=True).start()
    for _ in range(steps):
        b = q.get()
        if isinstance(b, BaseException):
            raise b
        yield b


def _batch_fns(jpegs: list[bytes], batch: int, size: int, name: str, device: torch.device, workers: int):
    """(cpu batch maker, gpu batch maker): the same rows, keys and boxes for both."""
    kw = dict(model_name=name, image_size=size, mean=(0.48, 0.46, 0.41), std=(0.27, 0.26, 0.28), policy="real",
              seed=0, epoch=0)
    cpu_collate, gpu_collate = Collate(**kw), Collate(**kw, decode_device=device)
    min_side = crop_source_side(size, CROP_SCALE[0])
    pool = ThreadPoolExecutor(workers)  # PIL releases the GIL while decoding

    def rows(i):
        idx = [(i * batch + j) % len(jpegs) for j in range(batch)]
        keys = np.array([f"s{i}-{j}" for j in range(batch)])
        return idx, {"key": keys, "caption": np.array(["a photo of a thing"] * batch, dtype=object),
                     "syn_captions": np.array([[]] * batch, dtype=object)}

    def cpu(i):
        idx, b = rows(i)
        decoded = list(pool.map(lambda k: decode_crop_source(jpegs[k], min_side), idx))
        px = np.empty(batch, dtype=object)
        px[:] = [p for p, _ in decoded]
        b.update(pixels=px, orig_w=np.array([w for _, (w, _) in decoded]),
                 orig_h=np.array([h for _, (_, h) in decoded]))
        return cpu_collate(b)

    def gpu(i):
        idx, b = rows(i)
        sizes = [Image.open(io.BytesIO(jpegs[k])).size for k in idx]  # Ray Data's header check ships these
        enc = np.empty(batch, dtype=object)
        enc[:] = [jpegs[k] for k in idx]
        b.update(image_bytes=enc, orig_w=np.array([w for w, _ in sizes]), orig_h=np.array([h for _, h in sizes]))
        return gpu_collate(b)

    return cpu, gpu, pool


def _train_loop(name: str, batches, steps: int, device: torch.device, warmup: int) -> dict:
    """A CLIP training step per batch (bf16 autocast on CUDA): images/s and data-wait fraction after `warmup`."""
    model = create_clip(name, output_dict=True).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = build_loss("clip", 0, 1)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    wait = total = 0.0
    images = 0
    it = iter(batches)
    for step in range(steps):
        t0 = time.perf_counter()
        b = next(it)
        t1 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(b["image"].to(device, non_blocking=True), b["texts"][0].to(device, non_blocking=True))
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        if step >= warmup:
            wait, total, images = wait + t1 - t0, total + time.perf_counter() - t0, images + b["image"].shape[0]
    fallbacks = int(b.get("decode_fallbacks", torch.tensor(0)))
    del model, opt
    return {"images_per_s": images / total, "data_wait": wait / total, "fallbacks": fallbacks}


def data_rows(name: str, batch: int, steps: int, workers: int, photo: tuple[int, int], pool_size: int) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size, _ = model_geometry(name)
    jpegs = make_jpegs(pool_size, [photo, (320, 240)])
    cpu, gpu, pool = _batch_fns(jpegs, batch, size, name, device, workers)
    warmup = min(2, steps - 1)
    res = {}
    try:
        for mode, fn in (("cpu", cpu), ("gpu", gpu)):
            res[mode] = _train_loop(name, _prefetched(fn, steps), steps, device, warmup)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        pool.shutdown()
    c, g = res["cpu"], res["gpu"]
    where = "nvJPEG on CUDA" if device.type == "cuda" else "libjpeg on CPU (smoke: the same code path, no GPU)"
    note = (f"batch {batch}, {steps} steps (first {warmup} not timed), half {photo[0]}x{photo[1]} and half 320x240 "
            f"JPEGs (q90); cpu: whole-image JPEG-draft decode on {workers} threads + collate crop; gpu: "
            f"decode_on gpu ({where}), CPU-decoded rows {g['fallbacks']}; one prefetch thread, 2 batches ahead")
    return [row("gpu-data", f"{name} images/s (decode on gpu)", g["images_per_s"], c["images_per_s"],
                "decode on cpu (same step)", "images/s", notes=note),
            row("gpu-data", f"{name} data wait (decode on gpu)", 100 * g["data_wait"], 100 * c["data_wait"],
                "decode on cpu", "% of step time", higher_is_better=False)]
