"""`clipdense synth`: plan the generation jobs, run them on a process pool, write the merged indexes.

Output layout under `out/` (see the package docstring for the design):
  web/00000.tar ...           pretraining corpus, alt text captions (img2dataset webdataset layout)
  curated/00000.tar ...       curated scenes, complete descriptions as captions
  ade/ADEChallengeData2016/   images/{training,validation}/ADE_*.jpg, annotations/.../ADE_*.png, objectInfo.csv
  nyu/                        sync/<scene>/..., test/<scene>/..., nyudepthv2_{train,test}_files_with_gt.txt
  coco/                       train2017/, val2017/, annotations/instances_{train,val}2017.json
  classes.json                class names (label = index + 1), colours, sizes
  synth.json                  resolved config and counts (also marks the directory as ours to overwrite)
"""
from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import time
from pathlib import Path

from clipdense.config import ConfigError

from .config import SynthConfig
from .scene import CLASSES, COLOURS, SIZES, K
from .writers import NYU_FRAMES_PER_SCENE, Job, atomic_write, run_job

DATASETS = ("web", "curated", "ade", "nyu", "coco")
DENSE_CHUNK = 250  # images per ADE / COCO job
MARKER = "synth.json"


def plan(cfg: SynthConfig) -> list[Job]:
    v = cfg.resolved()
    common = dict(out=str(cfg.out), seed=cfg.seed, quality=cfg.jpeg_quality, max_objects=cfg.max_objects)
    jobs: list[Job] = []

    def chunks(kind: str, split: str, total: int, per_job: int, size: int) -> None:
        for unit in range(math.ceil(total / per_job)):
            start = unit * per_job
            jobs.append(Job(kind, split, unit, start, min(per_job, total - start), size=size, **common))

    chunks("web", "train", v["web_images"], v["shard_size"], v["web_size"])
    chunks("curated", "train", v["curated_images"], v["shard_size"], v["web_size"])
    chunks("ade", "train", v["ade_train"], DENSE_CHUNK, v["dense_size"])
    chunks("ade", "val", v["ade_val"], DENSE_CHUNK, v["dense_size"])
    chunks("nyu", "train", v["nyu_train"], NYU_FRAMES_PER_SCENE, v["dense_size"])
    chunks("nyu", "test", v["nyu_test"], v["nyu_test_frames_per_room"], v["dense_size"])  # one job per room
    chunks("coco", "train", v["coco_train"], DENSE_CHUNK, v["dense_size"])
    chunks("coco", "val", v["coco_val"], DENSE_CHUNK, v["dense_size"])
    return jobs


def _prepare(out: Path) -> None:
    """Create `out`; clear our own previous output (never a directory we did not write)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"out: cannot create {out} ({e.strerror})") from None
    existing = [d for d in DATASETS if (out / d).exists()]
    if existing and not (out / MARKER).exists():
        raise ConfigError(f"out: {out} already holds {existing[0]}/ not written by clipdense synth; "
                          "choose an empty directory")
    for d in existing:
        shutil.rmtree(out / d)


def _cost(job: Job) -> float:
    return job.count * job.size**2


def _context():
    """spawn: safe even when the caller already runs threads (Ray, torch); workers only need numpy + PIL.
    spawn re-imports the caller's main script, which fails for `python - <<EOF` and `python -c`: fork there."""
    main_file = getattr(sys.modules["__main__"], "__file__", None)
    if main_file is not None and not os.path.isfile(main_file) and "fork" in mp.get_all_start_methods():
        return mp.get_context("fork")
    return mp.get_context("spawn")


def _execute(jobs: list[Job], workers: int) -> list[dict]:
    if workers <= 1 or len(jobs) <= 1:
        return [run_job(j) for j in jobs]
    # Biggest jobs first so the pool finishes evenly; results are put back in plan order.
    order = sorted(range(len(jobs)), key=lambda i: -_cost(jobs[i]))
    results: list[dict | None] = [None] * len(jobs)
    with _context().Pool(min(workers, len(jobs))) as pool:
        for i, res in zip(order, pool.imap(run_job, [jobs[i] for i in order], chunksize=1)):
            results[i] = res
    return results  # type: ignore[return-value]


def _write_indexes(out: Path, jobs: list[Job], results: list[dict]) -> dict:
    by = lambda kind, split: [r for j, r in zip(jobs, results) if j.kind == kind and j.split == split]  # noqa: E731
    counts: dict = {}
    for kind, split in [("web", "train"), ("curated", "train"), ("ade", "train"), ("ade", "val"),
                        ("nyu", "train"), ("nyu", "test"), ("coco", "train"), ("coco", "val")]:
        name = kind if split == "train" and kind in ("web", "curated") else f"{kind}_{split}"
        counts[name] = sum(r["images"] for r in by(kind, split))
    for split in ("train", "test"):
        counts[f"nyu_{split}_rooms"] = sum(r["images"] > 0 for r in by("nyu", split))

    web = by("web", "train")
    mentioned = sum(r["alt_mentioned"] for r in web)
    alt_stats = {"mentions_true_object": mentioned / max(counts["web"], 1),
                 "colour_correct_when_mentioned": sum(r["alt_colour_correct"] for r in web) / max(mentioned, 1)}

    ade = out / "ade" / "ADEChallengeData2016"
    pixels = [sum(r["pixels"][c] for r in by("ade", "train")) for c in range(K + 1)]
    rows = ["Idx,Ratio,Train,Val,Name"]
    for c, name in enumerate(CLASSES, start=1):
        ratio = pixels[c] / max(sum(pixels), 1)
        n_train = sum(r["present"][c] for r in by("ade", "train"))
        n_val = sum(r["present"][c] for r in by("ade", "val"))
        rows.append(f"{c},{ratio:.6f},{n_train},{n_val},{name}")
    atomic_write(ade / "objectInfo.csv", ("\n".join(rows) + "\n").encode())

    depth_range = [math.inf, -math.inf]
    for split in ("train", "test"):
        fname = f"nyudepthv2_{split}_files_with_gt.txt"
        lines = [line for r in by("nyu", split) for line in r["lines"]]
        atomic_write(out / "nyu" / fname, "".join(f"{line}\n" for line in lines).encode())
        for r in by("nyu", split):
            depth_range = [min(depth_range[0], r["depth_min"]), max(depth_range[1], r["depth_max"])]

    categories = [{"id": i, "name": n, "supercategory": "shape"} for i, n in enumerate(CLASSES, start=1)]
    for split in ("train", "val"):
        images, annotations = [], []
        for r in by("coco", split):
            for image, anns in r["records"]:
                images.append(image)
                for a in anns:
                    annotations.append({"id": len(annotations) + 1, **a})
        doc = {"info": {"description": "clipdense synthetic shapes world", "version": "1.0"}, "licenses": [],
               "images": images, "annotations": annotations, "categories": categories}
        atomic_write(out / "coco" / "annotations" / f"instances_{split}2017.json",
                     json.dumps(doc, separators=(",", ":")).encode())
        counts[f"coco_{split}_annotations"] = len(annotations)

    labels = {"0": "background", **{str(i): n for i, n in enumerate(CLASSES, 1)}}
    classes = {"classes": list(CLASSES), "labels": labels,
               "colours": {k: list(v) for k, v in COLOURS.items()}, "sizes_m": SIZES}
    atomic_write(out / "classes.json", json.dumps(classes, indent=1).encode())
    has_nyu = counts["nyu_train"] + counts["nyu_test"] > 0
    return {"counts": counts, "alt_stats": alt_stats,
            "nyu_depth_range_m": [round(x, 4) for x in depth_range] if has_nyu else None}


def run(cfg: SynthConfig) -> dict:
    """Generate every dataset of the shapes world under cfg.out; return a summary (counts, paths, seconds)."""
    t0 = time.perf_counter()
    out = Path(cfg.out)
    _prepare(out)
    jobs = plan(cfg)
    # Default: all cores, except for small runs where starting processes costs more than it saves.
    small = sum(j.count for j in jobs) < 2000
    workers = cfg.workers or (1 if small else os.cpu_count() or 1)
    results = _execute(jobs, workers)
    summary = _write_indexes(out, jobs, results)
    paths = {"web": out / "web", "curated": out / "curated", "ade": out / "ade" / "ADEChallengeData2016",
             "nyu": out / "nyu", "coco": out / "coco", "classes": out / "classes.json"}
    record = {"config": cfg.model_dump(mode="json"), "resolved": cfg.resolved(), **summary}
    atomic_write(out / MARKER, json.dumps(record, indent=1, sort_keys=True).encode())
    return {"out": str(out), "preset": cfg.preset, "seed": cfg.seed, **summary,
            "paths": {k: str(v) for k, v in paths.items()}, "workers": min(workers, max(len(jobs), 1)),
            "seconds": round(time.perf_counter() - t0, 2)}
