"""The synthetic "shapes" world: a pretraining corpus with noisy or accurate captions, plus dense tasks.

Scenes (scene.py): 1..4 upright flat shapes (CLASSES: circle, square, triangle, star, cross, ring; K = 6)
in 6 named COLOURS (each class has its TYPICAL_COLOUR 60% of the time: categories come with appearance priors,
as real ones do) and 3 physical SIZES, standing on a textured floor in front of a textured wall, seen by
a pinhole camera with NYUv2's field of view. Depth is predictable from the image: floor-contact row,
apparent size (physical size / depth) and haze all follow depth; nearer objects occlude farther ones.

Text (captions.py): every web image gets noisy alt text (a true object ~50% of the time, its colour wrong
~40% of those; otherwise product/filename filler). The curated subset gets `describe(scene)`: every object's
size, colour, class, position and what it is in front of, i.e. the semantics the dense tasks need.

Datasets (run.py, writers.py); dense images are `dense_size` (128 px), web/curated `web_size` (96 px):
- web/ and curated/: img2dataset webdataset shards `00000.tar` (+ `00000_stats.json`), members KEY.jpg,
  KEY.txt (caption), KEY.json (img2dataset metadata + "description"/"scene" ground truth: scoring only,
  never training text). KEY = 5-digit shard + 4-digit index, unique within a directory.
  Curated scenes are separate draws from the same generator (a disjoint RNG stream): none is in web/,
  as MSCOCO is not in the web crawl.
- ade/ADEChallengeData2016: ADE20k naming; labels uint8 PNG (mode L), 0 = background, 1..K = CLASSES.
- nyu/: BTS layout, RGB jpg + uint16 PNG depth in mm; list lines `rgb depth focal` (focal in px at this size).
  NYU frames come in scenes of 16 sharing one room (camera, wall, floor), like NYU's video sequences; the test
  split's scenes hold `nyu_test_frames_per_room` frames (fewer: more rooms for the same frames).
- ade/ADEChallengeData2016/atypical/validation/ADE_val_*.png: uint8, 1 on the visible pixels of objects whose
  colour is not their class's typical one (scores seg on them; never trains).
- coco/: COCO instances JSON, bbox (xywh) / area / RLE segmentation of the VISIBLE part; objects with
  fewer than 16 visible pixels get no annotation. Category ids 1..K = CLASSES.
Determinism: each image has its own RNG from (seed, dataset, split, index): identical bytes for a
seed + preset regardless of the number of workers.
"""
from __future__ import annotations

from . import captions, render, scene
from .captions import alt_text, describe
from .config import PRESETS, SynthConfig
from .render import Rendered
from .run import run
from .scene import CLASSES, COLOURS, SIZES, K, Obj, Scene, sample_scene

__all__ = ["CLASSES", "COLOURS", "K", "PRESETS", "SIZES", "Obj", "Rendered", "Scene", "SynthConfig",
           "alt_text", "captions", "describe", "render", "run", "sample_scene", "scene"]
