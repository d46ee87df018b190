"""Two kinds of text for a scene: noisy web alt text, and the complete curated description.

Alt text (every web image) mentions at most one true object, about half of the time, and then gets its
colour wrong ~40% of the time; otherwise it is product/filename filler unrelated to the image. The
description (curated subset, the MSCOCO role) names every object with its size, colour, class and
position, nearest first, and says which object is in front of which overlapping one: exactly the
semantics the dense tasks need.
"""
from __future__ import annotations

import math
import re

import numpy as np

from .scene import CLASSES, COLOURS, Obj, Scene

P_MENTION = 0.5  # alt text names a true object
P_WRONG_COLOUR = 0.4  # ... and then misnames its colour
P_SIZE_WORD = 0.3  # ... and says its size

_NOUNS = ("sticker", "icon", "logo", "wall decal", "clipart", "vector", "pendant", "sign", "stencil",
          "badge", "cookie cutter", "poster", "pattern", "button", "patch", "shape", "magnet", "toy")
_FILLERS = ("best price", "free shipping", "stock photo", "buy now", "hd wallpaper", "high quality",
            "sale", "new arrival", "top seller", "limited offer", "royalty free", "png", "download",
            "cheap", "wholesale", "in stock", "official store", "trending", "gift idea", "2019",
            "premium", "for sale", "hot deal", "clearance", "popular")
# Unrelated product text: no shape or colour word may appear here (checked by the tests).
_PRODUCTS = ("men's running shoes size 10", "vintage leather wallet", "kitchen faucet chrome finish",
             "wireless earbuds with charging case", "organic cotton t-shirt", "garden hose 50 ft",
             "stainless steel water bottle", "dog collar adjustable", "ceramic coffee mug",
             "office chair ergonomic", "usb c cable 2 pack", "bamboo cutting board", "yoga mat non slip",
             "phone case shockproof", "led desk lamp", "travel backpack 40l", "scented candle set",
             "wooden toy train", "baby stroller lightweight", "hiking boots waterproof",
             "living room ideas", "wedding dress lace", "car seat cover", "laptop stand aluminum",
             "untitled", "image", "photo", "home decor", "screenshot", "my new place")


def _camera_name(rng: np.random.Generator) -> str:
    n = int(rng.integers(1000, 9999))
    forms = (f"IMG_{n}", f"IMG_{n}.jpg", f"DSC{n:05d}", f"DSC_{n}.JPG", f"photo_{n}", f"image-{n}")
    return str(forms[int(rng.integers(len(forms)))])


def _filler(rng: np.random.Generator) -> str:
    if rng.random() < 0.3:
        return _camera_name(rng)
    k = int(rng.integers(1, 3))
    return " ".join(str(x) for x in rng.choice(_FILLERS, size=k, replace=False))


def alt_text_with_info(scene: Scene, rng: np.random.Generator) -> tuple[str, dict]:
    """Alt text plus what it says about the scene: {"mentioned": index | None, "colour_correct": bool | None}."""
    if rng.random() < P_MENTION:
        # Larger objects are likelier to be the one the uploader wrote about.
        areas = np.array([o.radius**2 for o in scene.objects])
        i = int(rng.choice(len(scene.objects), p=areas / areas.sum()))
        obj = scene.objects[i]
        wrong = rng.random() < P_WRONG_COLOUR
        colour = str(rng.choice([c for c in COLOURS if c != obj.colour])) if wrong else obj.colour
        size = f"{obj.size} " if rng.random() < P_SIZE_WORD else ""
        noun = str(rng.choice(_NOUNS))
        core = f"{size}{colour} {obj.shape} {noun}"
        form = int(rng.integers(4))
        if form == 0:
            text = f"{core} {_filler(rng)}"
        elif form == 1:
            text = f"{_filler(rng)} {core}"
        elif form == 2:
            text = f"{core} - {_filler(rng)} | {_filler(rng)}"
        else:
            text = core
        info = {"mentioned": i, "colour_correct": not wrong}
    else:
        form = int(rng.integers(3))
        product = str(rng.choice(_PRODUCTS))
        if form == 0:
            text = _camera_name(rng)
        elif form == 1:
            text = f"{product} {_filler(rng)}"
        else:
            text = f"{_filler(rng)} {product}"
        info = {"mentioned": None, "colour_correct": None}
    if rng.random() < 0.3:
        text = text.title() if rng.random() < 0.5 else text.upper()
    return text, info


def alt_text(scene: Scene, rng: np.random.Generator) -> str:
    return alt_text_with_info(scene, rng)[0]


def position_phrase(obj: Obj) -> str:
    col = "left" if obj.x < 1 / 3 else ("right" if obj.x > 2 / 3 else "")
    row = "top" if obj.y < 1 / 3 else ("bottom" if obj.y > 2 / 3 else "")
    if row and col:
        return f"at the {row} {col}"
    if row or col:
        return f"at the {row or col}"
    return "in the center"


def overlaps(a: Obj, b: Obj) -> bool:
    """Whether two objects' bounding circles overlap on screen (then the nearer one hides part of the other)."""
    return math.hypot(a.x - b.x, a.y - b.y) < a.radius + b.radius


def describe(scene: Scene) -> str:
    """Complete, accurate description in ONE sentence (COCO-style; CoCa captioners cut at the first period):
    every object nearest first, with its size, colour, position and what it stands in front of."""
    objs = scene.by_depth()
    parts = []
    for k, o in enumerate(objs):
        s = f"a {o.size} {o.colour} {o.shape} {position_phrase(o)}"
        behind = [f"the {b.colour} {b.shape}" for b in objs[k + 1:] if overlaps(o, b)]
        if behind:
            s += " in front of " + " and ".join(behind)
        parts.append(s)
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text[0].upper() + text[1:] + "."


_CLASS_RE = re.compile(r"\b(" + "|".join(CLASSES) + r")s?\b", re.IGNORECASE)
_COLOUR_RE = re.compile(r"\b(" + "|".join(COLOURS) + r")\b", re.IGNORECASE)


def mentioned_classes(text: str) -> list[str]:
    """Shape-class words in a text (used by tests and caption statistics)."""
    return [m.lower() for m in _CLASS_RE.findall(text)]


def mentioned_colours(text: str) -> list[str]:
    return [m.lower() for m in _COLOUR_RE.findall(text)]
