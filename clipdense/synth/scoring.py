"""How well captions describe the synthetic world: scored against each image's scene metadata (ground truth that
scores captions and never trains). The demo compares the web corpus' alt texts with the recaptioner's captions."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from clipdense.data.shards import read_shard_local
from clipdense.data.storage import Storage
from clipdense.synth.captions import mentioned_classes, mentioned_colours


def caption_accuracy(text: str, scene: dict) -> float:
    """Fraction of the scene's objects whose colour + shape the text names (scores captions; never trains)."""
    objs = scene.get("objects", [])
    if not objs or not text:
        return 0.0
    low = text.lower()
    return sum(f"{o['colour']} {o['shape']}" in low for o in objs) / len(objs)


def word_recall(text: str, scene: dict) -> dict[str, float]:
    """Fractions of the scene's objects whose colour word / shape word the text contains, each on its own: tells
    which attribute a captioner has learnt (at CPU budget colours come long before shapes)."""
    objs = scene.get("objects", [])
    if not objs or not text:
        return {"colour": 0.0, "shape": 0.0}
    colours, shapes = set(mentioned_colours(text)), set(mentioned_classes(text))
    return {"colour": sum(o["colour"] in colours for o in objs) / len(objs),
            "shape": sum(o["shape"] in shapes for o in objs) / len(objs)}


def score_captions(web_dir: Path, recap_dir: Path, limit: int = 2000) -> dict:
    """Caption accuracy and colour / shape word recall of the alt texts vs the synthetic captions, against the
    world's scene metadata (means over images; a synthetic score averages the image's captions)."""
    scenes, alts = {}, {}
    for tar in sorted(web_dir.glob("*.tar")):
        for r in read_shard_local(Storage(str(tar)), validate="none"):
            if r["meta"] and len(scenes) < limit:
                scenes[r["key"]] = json.loads(r["meta"]).get("scene", {})
                alts[r["key"]] = r["caption"] or ""

    def scores(text: str, scene: dict) -> np.ndarray:
        recall = word_recall(text, scene)
        return np.array([caption_accuracy(text, scene), recall["colour"], recall["shape"]])

    alt, syn = [], []
    for f in sorted(recap_dir.glob("*.parquet")):
        for r in pq.read_table(f, columns=["key", "syn_captions"]).to_pylist():
            if r["key"] in scenes and r["syn_captions"]:
                scene = scenes[r["key"]]
                alt.append(scores(alts[r["key"]], scene))
                syn.append(np.mean([scores(c, scene) for c in r["syn_captions"]], axis=0))
    a, s = (np.mean(x, axis=0) if x else np.zeros(3) for x in (alt, syn))
    return {"images_scored": len(alt), "alt_text_accuracy": float(a[0]), "synthetic_accuracy": float(s[0]),
            "alt_text_colour_recall": float(a[1]), "synthetic_colour_recall": float(s[1]),
            "alt_text_shape_recall": float(a[2]), "synthetic_shape_recall": float(s[2])}
