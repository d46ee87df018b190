"""How well captions describe the synthetic world: scored against each image's scene metadata (ground truth that
scores captions and never trains). The demo compares the web corpus' alt texts, the world's true descriptions and
any recaptions-format caption folder (the recaptioner's, the oracle's).

Atypical objects. Each class has a typical colour (scene.TYPICAL_COLOUR, one class per colour) that most of its
objects wear, so a captioner can name a shape from the colour alone. Objects of any other colour show what it
learnt about shape: on those, "atypical accuracy" is the fraction it names bound ("<colour> <shape>"), and "prior
error" the fraction where it names instead the shape whose typical colour the object wears (see `atypical_counts`).
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from clipdense.data.shards import read_shard_local
from clipdense.data.storage import Storage
from clipdense.synth.captions import mentioned_classes, mentioned_colours
from clipdense.synth.scene import TYPICAL_COLOUR

# The shape a colour suggests on its own: the class whose typical colour it is.
PRIOR_SHAPE: dict[str, str] = {colour: shape for shape, colour in TYPICAL_COLOUR.items()}
# Per-caption scores, in this order: means over images, averaged first over an image's captions.
MEAN_SCORES = ("accuracy", "colour_recall", "shape_recall")
# Per-caption counts over atypical objects, pooled over images (an image's captions averaged).
ATYPICAL_COUNTS = ("atypical", "bound", "eligible", "prior")


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


@lru_cache(maxsize=None)
def _pair_pattern(colour: str, shape: str) -> re.Pattern:
    return re.compile(rf"\b{re.escape(colour)} {re.escape(shape)}s?\b", re.IGNORECASE)


def names_pair(text: str, colour: str, shape: str) -> bool:
    """Whether the text names "<colour> <shape>": the two words adjacent, whole words, a plural "s" allowed."""
    return bool(text) and _pair_pattern(colour, shape).search(text) is not None


def is_atypical(obj: Mapping) -> bool:
    return obj["colour"] != TYPICAL_COLOUR[obj["shape"]]


def atypical_counts(text: str, scene: dict) -> np.ndarray:
    """[atypical, bound, eligible, prior] for one caption of one scene, over the scene's atypical objects (colour
    != its class's typical colour):
    - atypical: how many there are;
    - bound: how many of them the caption names as "<colour> <shape>" (`names_pair`);
    - eligible: those whose prior pair ("<colour> <PRIOR_SHAPE[colour]>", e.g. a red square's "red circle") is not
      itself an object of the scene, so naming that pair can only be wrong;
    - prior: how many eligible ones the caption names by their prior pair (whether or not it also names them
      right): the captioner fell back on the colour prior instead of reading the shape.
    Rates: atypical accuracy = bound / atypical, prior error = prior / eligible, pooled over objects."""
    objs = scene.get("objects", [])
    present = {(o["colour"], o["shape"]) for o in objs}
    counts = np.zeros(len(ATYPICAL_COUNTS))
    for o in filter(is_atypical, objs):
        prior = (o["colour"], PRIOR_SHAPE[o["colour"]])
        eligible = prior not in present
        counts += (1, names_pair(text, o["colour"], o["shape"]), eligible, eligible and names_pair(text, *prior))
    return counts


def score_texts(scenes: Mapping[str, dict], texts: Mapping[str, Sequence[str]], name: str) -> dict:
    """`<name>_accuracy`, `_colour_recall`, `_shape_recall` (means over images of `caption_accuracy` /
    `word_recall`), `<name>_atypical_accuracy` and `<name>_atypical_prior_error` (pooled over the atypical objects
    of every image, see `atypical_counts`), for one caption source: key -> that image's captions (each averaged
    within its image). Scores the keys of `texts` that `scenes` holds; an image without captions scores 0."""
    means, counts, images = np.zeros(len(MEAN_SCORES)), np.zeros(len(ATYPICAL_COUNTS)), 0
    for key, captions in texts.items():
        if key not in scenes:
            continue
        scene, captions = scenes[key], list(captions) or [""]
        images += 1
        means += np.mean([[caption_accuracy(c, scene), *word_recall(c, scene).values()] for c in captions], axis=0)
        counts += np.mean([atypical_counts(c, scene) for c in captions], axis=0)
    atypical, bound, eligible, prior = counts
    out = {f"{name}_{m}": float(v / max(images, 1)) for m, v in zip(MEAN_SCORES, means)}
    out[f"{name}_atypical_accuracy"] = float(bound / atypical) if atypical else 0.0
    out[f"{name}_atypical_prior_error"] = float(prior / eligible) if eligible else 0.0
    return out


def read_world_texts(web_dir: Path, limit: int = 2000) -> tuple[dict, dict, dict]:
    """(scenes, alt texts, true descriptions) by key, of the first `limit` web images with scene metadata."""
    scenes, alts, truths = {}, {}, {}
    for tar in sorted(web_dir.glob("*.tar")):
        for r in read_shard_local(Storage(str(tar)), validate="none"):
            if r["meta"] and len(scenes) < limit:
                meta = json.loads(r["meta"])
                scenes[r["key"]] = meta.get("scene", {})
                alts[r["key"]] = [r["caption"] or ""]
                truths[r["key"]] = [meta.get("description") or ""]
    return scenes, alts, truths


def read_caption_folder(folder: Path) -> dict[str, list[str]]:
    """key -> syn_captions of a recaptions-format folder (`*.parquet` with `key` and `syn_captions`); rows
    without captions are left out."""
    texts = {}
    for f in sorted(folder.glob("*.parquet")):
        for r in pq.read_table(f, columns=["key", "syn_captions"]).to_pylist():
            if r["syn_captions"]:
                texts[r["key"]] = list(r["syn_captions"])
    return texts


def score_caption_sources(web_dir: Path, sources: Mapping[str, Path], limit: int = 2000) -> dict:
    """Caption quality of the alt texts (`alt_text_*`), the world's true descriptions (`true_*`) and each
    recaptions-format folder in `sources` (`<name>_*`, e.g. synthetic, oracle), all on the same images: those of
    the first `limit` web images that every folder captions. Per source: accuracy, colour / shape recall,
    atypical accuracy and prior error (`score_texts`); plus `images_scored`, `atypical_objects` and
    `atypical_prior_eligible` (the pooled denominators)."""
    scenes, alts, truths = read_world_texts(web_dir, limit)
    folders = {name: read_caption_folder(Path(folder)) for name, folder in sources.items()}
    keys = [k for k in scenes if all(k in texts for texts in folders.values())]
    pick = lambda texts: {k: texts[k] for k in keys}  # noqa: E731
    out: dict = {"images_scored": len(keys)}
    for name, texts in {"alt_text": alts, **folders, "true": truths}.items():
        out.update(score_texts(scenes, pick(texts), name))
    totals = sum((atypical_counts("", scenes[k]) for k in keys), np.zeros(len(ATYPICAL_COUNTS)))
    out["atypical_objects"], out["atypical_prior_eligible"] = int(totals[0]), int(totals[2])
    return out


def score_captions(web_dir: Path, recap_dir: Path, limit: int = 2000) -> dict:
    """Caption accuracy and colour / shape word recall of the alt texts vs the synthetic captions (and the true
    descriptions), overall and on atypically coloured objects (`score_caption_sources`)."""
    return score_caption_sources(web_dir, {"synthetic": recap_dir}, limit)
