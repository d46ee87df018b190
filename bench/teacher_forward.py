"""Recaption's teacher step (issue 35) vs a plain loop doing the same work, per core.

    python -m bench.teacher_forward [--shards 4] [--per-shard 250] [--image-px 320] [--views 2]
                                    [--teacher clip-tiny] [--pretrained PATH] [--cpus N] [--repeats 2] [--quick]

Both sides read the same tar shards and, per image: decode the original (PIL, RGB), draw `views` DataCompDR views
(torchvision RandomResizedCrop(224, bicubic) + RandAugment(2, 9, 31), ToTensor), resize them to the teacher's side,
normalise, embed them with the open_clip teacher, and embed the caption (plus one synthetic caption: the pipeline
runs the echo engine, which copies it); and score each caption (the pipeline's `syn_score`): the image under the
teacher's eval transform, embedded, against its captions' embeddings. The pipeline is `clipdense recaption` with
`teachers:` and the echo captioner (no CPU reserved), two ways: in process (`ray.in_process`: one DataLoader decode
worker per core draws the views, the run's process embeds them) and on Ray Data (one teacher actor per core, each
1 CPU). Its time includes writing the DataCompDR tars. The plain side is one process on one thread, and one process
per core over a split of the shards. Ratio: (pipeline images/s / cores) / (plain per-core images/s on all cores);
goal >= 0.9. The sides alternate within each round. Writes bench/results/teacher_forward.json.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import open_clip
import torch
import torchvision.transforms as T
from PIL import Image

from bench.common import RoundLoads, add_local_ray_args, row, save
from bench.jpeg_shards import make_shards
from clipdense.config import build_config
from clipdense.models.registry import create_clip_and_transforms, tokenizer_for
from clipdense.recaption import RecaptionConfig, run


def plain_loop(paths: list[str], teacher: str, pretrained: str | None, views: int) -> dict:
    """The same work with PIL + torchvision + open_clip, one thread."""
    torch.set_num_threads(1)
    model, _, preprocess = create_clip_and_transforms(teacher, pretrained=pretrained)
    model.eval()
    tok = tokenizer_for(teacher)
    side = model.visual.image_size if isinstance(model.visual.image_size, int) else model.visual.image_size[0]
    view = T.Compose([T.RandomResizedCrop(224, interpolation=T.InterpolationMode.BICUBIC),
                      T.RandAugment(2, 9, 31), T.ToTensor()])
    norm = T.Compose([T.Resize(side, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                      T.Normalize(open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)])
    t0, n = time.perf_counter(), 0
    with torch.no_grad():
        for path in paths:
            with tarfile.open(path) as tar:
                files = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
            keys = sorted({name.rsplit(".", 1)[0] for name in files})
            for s in range(0, len(keys), 32):
                batch = keys[s:s + 32]
                imgs = [Image.open(io.BytesIO(files[f"{k}.jpg"])).convert("RGB") for k in batch]
                x = torch.stack([norm(view(im)) for im in imgs for _ in range(views)])
                model.encode_image(x, normalize=True)
                texts = [files.get(f"{k}.txt", b"").decode() for k in batch for _ in range(2)]
                text_emb = model.encode_text(tok(texts), normalize=True).view(len(batch), 2, -1)
                # each caption's CLIP score: the image under the eval transform against its captions
                image_emb = model.encode_image(torch.stack([preprocess(im) for im in imgs]), normalize=True)
                (text_emb @ image_emb[:, :, None]).squeeze(-1).tolist()
                n += len(batch)
    seconds = time.perf_counter() - t0
    return {"images": n, "seconds": round(seconds, 3), "images_per_s": round(n / seconds, 2)}


def _plain_worker(args) -> dict:
    return plain_loop(*args)


def plain_pool(paths: list[str], teacher: str, pretrained: str | None, views: int, cpus: int) -> dict:
    """One plain process per core over a split of the shards; per-core rate = total images / cores / wall."""
    splits = [paths[i::cpus] for i in range(cpus) if paths[i::cpus]]
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(len(splits)) as pool:
        results = pool.map(_plain_worker, [(s, teacher, pretrained, views) for s in splits])
    seconds = time.perf_counter() - t0
    n = sum(r["images"] for r in results)
    return {"images": n, "seconds": round(seconds, 3), "per_core": round(n / seconds / len(splits), 2)}


def pipeline(paths: list[str], out: Path, args: argparse.Namespace, in_process: bool) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cfg = build_config(RecaptionConfig, {
        "input": paths, "output": str(out), "stats": {"enabled": False},
        "engine": {"kind": "echo", "num_captions": 1, "batch_size": 256, "num_cpus": 0},
        "decode": {"size": 24},  # the captioner's copy is tiny; the teachers decode the original themselves
        # on Ray, one logical CPU beside the teachers' for the shard reads (else they would never be scheduled)
        "ray": {"in_process": True} if in_process else {"num_cpus": args.cpus + 1},
        "teachers": {"models": [{"name": args.teacher, "pretrained": args.pretrained}], "views": args.views,
                     "device": "cpu", "batch_size": 32, "concurrency": args.cpus, "num_cpus": 1}})
    s = run(cfg)
    return {"images": s["rows_in"], "seconds": s["seconds"], "images_per_s": s["images_per_s"]}


def parse_args(argv: list[str] | None, quick: bool) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench.teacher_forward")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--per-shard", type=int, default=250)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--teacher", default="clip-tiny")
    ap.add_argument("--pretrained", default=None)
    ap.add_argument("--quick", action="store_true")
    args = add_local_ray_args(ap, repeats=2).parse_args(argv or [])
    if quick or args.quick:
        args.shards, args.per_shard, args.repeats, args.quick = 2, 32, 1, True
    return args


def main(argv: list[str] | None = None, quick: bool = False) -> dict:
    args = parse_args(argv, quick)
    work = Path(tempfile.mkdtemp(prefix="teacher_forward_"))
    try:
        paths = make_shards(work / "shards", args.shards, args.per_shard, args.image_px)
        runs = {"plain": [], "plain_all_cores": [], "in_process": [], "ray": []}
        loads = RoundLoads(quick=args.quick)
        for _ in range(args.repeats):
            loads.start_round()
            runs["plain"].append(plain_loop(paths, args.teacher, args.pretrained, args.views))
            runs["plain_all_cores"].append(plain_pool(paths, args.teacher, args.pretrained, args.views, args.cpus))
            runs["in_process"].append(pipeline(paths, work / "out", args, in_process=True))
            runs["ray"].append(pipeline(paths, work / "out", args, in_process=False))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    best = {k: max(v, key=lambda r: r.get("images_per_s", r.get("per_core", 0))) for k, v in runs.items()}
    peer = best["plain_all_cores"]["per_core"]
    ratios = {k: round(best[k]["images_per_s"] / args.cpus / peer, 3) for k in ("in_process", "ray")}
    result = {"bench": "teacher_forward", "cpus": args.cpus, "teacher": args.teacher, "views": args.views,
              "images": args.shards * args.per_shard, **loads.summary(), "best": best,
              "all_runs": runs, "per_core_ratio": ratios, "goal_ratio": 0.9}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "teacher_forward_detail.json").write_text(json.dumps(result, indent=2))
    notes = (f"{args.shards}x{args.per_shard} JPEGs {args.image_px}px; best of {args.repeats} alternating rounds; "
             f"{loads.note()}")
    metric = f"teacher step ({args.teacher}, {args.views} views) images/s per core"
    save("teacher_forward", [
        row("recaption", f"{metric}, in process (ray.in_process, no Ray)", best["in_process"]["images_per_s"] /
            args.cpus, peer, "plain PIL + torchvision + open_clip loop, one process per core", "images/s/core",
            notes=notes),
        row("recaption", f"{metric}, Ray Data", best["ray"]["images_per_s"] / args.cpus, peer,
            "plain PIL + torchvision + open_clip loop, one process per core", "images/s/core", notes=notes)], out)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
