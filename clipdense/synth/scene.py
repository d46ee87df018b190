"""The shapes world: what a scene is and how one is sampled.

A scene is a room seen by a pinhole camera: a floor plane receding to a back wall, and 1..N upright flat
shapes standing on the floor, each at its own depth. Geometry makes depth predictable from the image:
an object's floor-contact row, its apparent size (physical size / depth) and its haze all follow its depth.
Coordinates are normalised: u (x) and v (y, 0 = top) in [0, 1] of the image width/height (images are square),
so one scene renders at any resolution.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring")
K = len(CLASSES)
# Named object colours (saturated, so they stand out from the muted backgrounds).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 35, 35),
    "green": (40, 165, 60),
    "blue": (40, 75, 210),
    "yellow": (235, 205, 35),
    "purple": (135, 55, 175),
    "orange": (245, 130, 25),
}
# Each class's typical colour, and how often an object has it (else any other colour): real categories come with
# appearance priors (grass is green, stop signs red), which is also what lets a small captioner learn them.
TYPICAL_COLOUR: dict[str, str] = dict(zip(CLASSES, ("red", "blue", "green", "yellow", "purple", "orange")))
P_TYPICAL = 0.6
# Physical size classes (object radius in metres); the apparent size is radius * focal / depth.
SIZES: dict[str, float] = {"small": 0.16, "medium": 0.26, "large": 0.40}
WALL_TEXTURES = ("plain", "stripes", "gradient", "noise")
FLOOR_TEXTURES = ("plain", "checker", "planks", "noise")

# NYUv2 intrinsics (fx 518.8579 at 640 px wide) expressed per image width: the same field of view at any size.
FOCAL = 518.8579 / 640.0
MIN_DEPTH, MAX_DEPTH = 0.5, 9.5
# Apparent radius bounds (fraction of the width) that keep every object visible yet not filling the frame.
MIN_APPARENT, MAX_APPARENT = 0.06, 0.22


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    x: float  # centre, fraction of width
    y: float  # centre, fraction of height
    radius: float  # apparent radius, fraction of width
    depth: float  # metres from the camera
    angle: float = 0.0  # rotation, radians
    rgb: tuple[int, int, int] = (0, 0, 0)  # the named colour with a small per-object jitter

    @property
    def label(self) -> int:
        """Segmentation / category id: 1..K (0 is background)."""
        return CLASSES.index(self.shape) + 1


@dataclass(frozen=True)
class Background:
    horizon: float  # row of the vanishing line, fraction of height
    floor_k: float  # floor depth at row v is floor_k / (v - horizon)
    wall_depth: float  # metres, at the image centre column
    wall_slant: float  # relative depth change across the width
    wall_texture: str
    floor_texture: str
    wall_rgb: tuple[tuple[int, int, int], tuple[int, int, int]]
    floor_rgb: tuple[tuple[int, int, int], tuple[int, int, int]]
    period: float  # texture scale (image fraction on the wall, metres on the floor)
    tex_angle: float  # radians
    haze_rgb: tuple[int, int, int]
    haze_dist: float  # metres; haze weight is 1 - exp(-depth / haze_dist)
    noise_seed: int  # seeds the value-noise textures and sensor noise, so rendering stays deterministic

    def wall_depth_at(self, u):
        return self.wall_depth * (1.0 + self.wall_slant * (u - 0.5))


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: Background
    meta: dict = field(default_factory=dict, compare=False)

    def by_depth(self) -> list[Obj]:
        """Objects nearest first."""
        return sorted(self.objects, key=lambda o: o.depth)

    def to_dict(self) -> dict:
        def rounded(d: dict) -> dict:
            return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}

        return {
            "objects": [rounded(asdict(o)) for o in self.objects],
            "background": rounded(asdict(self.background)),
        }


def _muted_rgb(rng: np.random.Generator) -> tuple[int, int, int]:
    """A low-saturation colour (greys, beiges, browns, slates) for walls and floors."""
    h = rng.random()
    s = rng.uniform(0.0, 0.28)
    v = rng.uniform(0.35, 0.9)
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    r, g, b = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return int(r * 255), int(g * 255), int(b * 255)


def _pair(rng: np.random.Generator):
    a = _muted_rgb(rng)
    # The second colour is the first shifted in brightness: textures stay readable but never look like objects.
    shift = rng.uniform(0.55, 0.85) if rng.random() < 0.5 else rng.uniform(1.15, 1.4)
    b = tuple(int(min(255, c * shift)) for c in a)
    return a, b


def sample_background(rng: np.random.Generator) -> Background:
    horizon = float(rng.uniform(0.18, 0.38))
    bottom_depth = float(rng.uniform(0.85, 1.4))  # floor depth at the bottom row
    return Background(
        horizon=horizon,
        floor_k=bottom_depth * (1.0 - horizon),
        wall_depth=float(rng.uniform(4.5, 8.0)),
        wall_slant=float(rng.uniform(-0.2, 0.2)),
        wall_texture=str(rng.choice(WALL_TEXTURES)),
        floor_texture=str(rng.choice(FLOOR_TEXTURES)),
        wall_rgb=_pair(rng),
        floor_rgb=_pair(rng),
        period=float(rng.uniform(0.08, 0.3)),
        tex_angle=float(rng.uniform(0, math.pi)),
        haze_rgb=tuple(int(c) for c in rng.integers(170, 230, size=3)),
        haze_dist=float(rng.uniform(9.0, 18.0)),
        noise_seed=int(rng.integers(0, 2**31 - 1)),
    )


def place_object(rng: np.random.Generator, bg: Background, shape: str, colour: str, size: str) -> Obj | None:
    """Stand a shape on the floor at a depth that keeps its apparent size within bounds; None if none fits."""
    r_m = SIZES[size]
    near = max(r_m * FOCAL / MAX_APPARENT, bg.floor_k / (1.0 - bg.horizon) * 1.08)
    far = min(r_m * FOCAL / MIN_APPARENT, bg.wall_depth * (1.0 - abs(bg.wall_slant) / 2) - 0.4)
    if far <= near:
        return None
    # Uniform in inverse depth: as many near objects as far ones on screen.
    depth = 1.0 / rng.uniform(1.0 / far, 1.0 / near)
    radius = r_m * FOCAL / depth
    contact = bg.horizon + bg.floor_k / depth  # the floor row at this depth
    jitter = rng.integers(-18, 19, size=3)
    return Obj(
        shape=shape,
        colour=colour,
        size=size,
        x=float(rng.uniform(radius * 0.6, 1.0 - radius * 0.6)),
        y=float(contact - radius * 0.92),
        radius=float(radius),
        depth=float(depth),
        angle=float(rng.uniform(-0.5, 0.5)) if shape != "circle" and shape != "ring" else 0.0,
        rgb=tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[colour], jitter)),
    )


def _too_hidden(new: Obj, others: list[Obj]) -> bool:
    # Overlap is welcome (occlusion is the point) but no object may be mostly covered by a nearer one.
    for o in others:
        dist = math.hypot(new.x - o.x, new.y - o.y)
        near = new if new.depth < o.depth else o
        # The farther object's centre must not sit under the nearer one.
        if dist < 0.6 * max(new.radius, o.radius) or dist < 0.85 * near.radius:
            return True
    return False


def sample_scene(
    rng: np.random.Generator,
    max_objects: int = 4,
    background: Background | None = None,
) -> Scene:
    """Sample one scene: 1..max_objects objects with distinct (colour, shape) pairs on a textured room."""
    bg = background if background is not None else sample_background(rng)
    weights = np.array([0.15, 0.3, 0.3, 0.25, 0.15, 0.1][:max_objects], dtype=float)
    n = int(rng.choice(np.arange(1, max_objects + 1), p=weights / weights.sum()))
    objects: list[Obj] = []
    used: set[tuple[str, str]] = set()
    for _ in range(n * 8):  # bounded rejection sampling
        if len(objects) == n:
            break
        shape = str(rng.choice(CLASSES))
        colour = TYPICAL_COLOUR[shape] if rng.random() < P_TYPICAL else str(rng.choice(
            [c for c in COLOURS if c != TYPICAL_COLOUR[shape]]))
        size = str(rng.choice(list(SIZES)))
        if (colour, shape) in used:
            continue
        obj = place_object(rng, bg, shape, colour, size)
        if obj is None or _too_hidden(obj, objects):
            continue
        objects.append(obj)
        used.add((colour, shape))
    if not objects:  # cannot happen with the default ranges; keep the contract "at least one object"
        objects.append(place_object(np.random.default_rng(0), bg, CLASSES[0], "red", "large"))
    return Scene(objects=tuple(objects), background=bg)
