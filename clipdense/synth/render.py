"""Rasterise a scene: RGB plus exact dense ground truth (segmentation, metric depth, visible instance masks).

Painter's algorithm, far to near, so a pixel covered by several objects takes the nearest one's colour,
label and depth. Background: a back wall (image-space texture) and a floor plane textured in world
coordinates (so tiles shrink with distance); everything is hazed with depth and objects cast a contact shadow.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .scene import FOCAL, MAX_DEPTH, MIN_DEPTH, Background, Obj, Scene


class Rendered(NamedTuple):
    rgb: np.ndarray  # H x W x 3 uint8
    seg: np.ndarray  # H x W uint8: 0 background, 1..K shape class
    depth: np.ndarray  # H x W float32 metres
    masks: np.ndarray  # N x H x W bool: visible pixels of each object, in scene.objects order


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    return np.meshgrid(c, c)  # U (columns), V (rows)


def _value_noise(x: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    """Smooth noise in [0, 1]: bilinear interpolation of a random lattice (wrapping every 32 cells)."""
    lattice = np.random.default_rng(seed).random((32, 32), dtype=np.float32)
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = x - x0, y - y0
    xi, yi = x0.astype(np.int64) % 32, y0.astype(np.int64) % 32
    xj, yj = (xi + 1) % 32, (yi + 1) % 32
    top = lattice[yi, xi] * (1 - fx) + lattice[yi, xj] * fx
    bottom = lattice[yj, xi] * (1 - fx) + lattice[yj, xj] * fx
    return top * (1 - fy) + bottom * fy


def _mix(pair, w: np.ndarray) -> np.ndarray:
    a, b = (np.asarray(c, dtype=np.float32) for c in pair)
    return a * (1 - w[..., None]) + b * w[..., None]


def _wall(bg: Background, U, V) -> np.ndarray:
    t = U * math.cos(bg.tex_angle) + V * math.sin(bg.tex_angle)
    if bg.wall_texture == "stripes":
        w = (np.sin(2 * math.pi * t / bg.period) > 0).astype(np.float32)
    elif bg.wall_texture == "gradient":
        w = np.clip((t - t.min()) / max(float(t.max() - t.min()), 1e-6), 0, 1)
    elif bg.wall_texture == "noise":
        w = _value_noise(U / bg.period, V / bg.period, bg.noise_seed)
    else:
        w = np.zeros_like(U)
    return _mix(bg.wall_rgb, w)


def _floor(bg: Background, U, depth) -> np.ndarray:
    X = (U - 0.5) * depth / FOCAL  # metres across
    tile = bg.period * 3.0
    if bg.floor_texture == "checker":
        w = ((np.floor(X / tile) + np.floor(depth / tile)) % 2).astype(np.float32)
    elif bg.floor_texture == "planks":
        w = (np.floor(X / tile) % 2).astype(np.float32)
    elif bg.floor_texture == "noise":
        w = _value_noise(X / tile, depth / tile, bg.noise_seed + 7)
    else:
        w = np.zeros_like(U)
    # Fade texture contrast with distance (sub-pixel tiles would otherwise alias into moire).
    w = 0.5 + (w - 0.5) * np.exp(-depth / 5.0)
    return _mix(bg.floor_rgb, w)


def _haze(rgb: np.ndarray, depth, bg: Background) -> np.ndarray:
    h = 1.0 - np.exp(-np.asarray(depth, dtype=np.float32) / bg.haze_dist)
    h = h[..., None] if np.ndim(h) == rgb.ndim - 1 else h
    return rgb * (1 - h) + np.asarray(bg.haze_rgb, dtype=np.float32) * h


def _star_mask(px: np.ndarray, py: np.ndarray, inner: float = 0.42) -> np.ndarray:
    rho = np.hypot(px, py)
    theta = np.arctan2(px, -py) % (2 * math.pi / 5)  # angle from "up", folded into one 72-degree sector
    phi = np.minimum(theta, 2 * math.pi / 5 - theta)  # 0 at a tip, 36 degrees at an inner vertex
    qx, qy = rho * np.cos(phi), rho * np.sin(phi)
    p1 = np.array([1.0, 0.0])
    p2 = inner * np.array([math.cos(math.pi / 5), math.sin(math.pi / 5)])
    nx, ny = -(p2[1] - p1[1]), p2[0] - p1[0]  # normal of the tip-to-inner edge
    side = nx * (qx - p1[0]) + ny * (qy - p1[1])
    origin_side = nx * (0 - p1[0]) + ny * (0 - p1[1])
    return side * np.sign(origin_side) >= 0


def shape_mask(obj: Obj, U: np.ndarray, V: np.ndarray) -> np.ndarray:
    """Amodal (unoccluded) mask of one object on the pixel grid."""
    dx, dy = (U - obj.x) / obj.radius, (V - obj.y) / obj.radius
    ca, sa = math.cos(obj.angle), math.sin(obj.angle)
    px, py = dx * ca + dy * sa, -dx * sa + dy * ca
    r2 = px * px + py * py
    ax, ay = np.abs(px), np.abs(py)
    if obj.shape == "circle":
        return r2 <= 1.0
    if obj.shape == "ring":
        return (r2 <= 1.0) & (r2 >= 0.55**2)
    if obj.shape == "square":
        return np.maximum(ax, ay) <= 0.78
    if obj.shape == "triangle":  # equilateral, circumradius 1, apex up
        return (py <= 0.5) & (ax <= (py + 1.0) / math.sqrt(3.0))
    if obj.shape == "cross":
        return ((ax <= 0.3) & (ay <= 0.9)) | ((ax <= 0.9) & (ay <= 0.3))
    if obj.shape == "star":
        return _star_mask(px, py)
    raise ValueError(f"unknown shape {obj.shape!r}")


def render(scene: Scene, size: int) -> Rendered:
    bg = scene.background
    U, V = _grid(size)
    wall_d = bg.wall_depth_at(U)
    below = V - bg.horizon
    floor_d = np.where(below > 1e-6, bg.floor_k / np.maximum(below, 1e-6), np.inf)
    is_floor = floor_d < wall_d
    depth = np.where(is_floor, floor_d, wall_d).astype(np.float32)
    rgb = np.where(is_floor[..., None], _floor(bg, U, depth), _wall(bg, U, V))

    for o in scene.objects:  # soft contact shadow on the floor under each object
        contact = bg.horizon + bg.floor_k / o.depth
        e2 = ((U - o.x) / (o.radius * 1.1)) ** 2 + ((V - contact) / (o.radius * 0.22)) ** 2
        shade = 1.0 - 0.45 * np.clip(1.0 - e2, 0.0, 1.0) * is_floor
        rgb = rgb * shade[..., None]
    rgb = _haze(rgb, depth, bg)

    seg = np.zeros((size, size), dtype=np.uint8)
    inst = np.full((size, size), -1, dtype=np.int16)
    order = sorted(range(len(scene.objects)), key=lambda i: -scene.objects[i].depth)  # far to near
    for i in order:
        o = scene.objects[i]
        m = shape_mask(o, U, V)
        # Lit from above: top of the object brighter than its bottom; then haze by the object's depth.
        light = 1.12 - 0.25 * np.clip((V - (o.y - o.radius)) / (2 * o.radius), 0, 1)
        colour = np.asarray(o.rgb, dtype=np.float32) * light[..., None]
        colour = _haze(colour, o.depth, bg)
        rgb = np.where(m[..., None], colour, rgb)
        seg[m] = o.label
        depth[m] = o.depth
        inst[m] = i

    noise = np.random.default_rng(bg.noise_seed + 13).normal(0.0, 3.0, size=rgb.shape).astype(np.float32)
    rgb8 = np.clip(rgb + noise, 0, 255).astype(np.uint8)
    masks = inst[None] == np.arange(len(scene.objects), dtype=np.int16)[:, None, None]
    depth = np.clip(depth, MIN_DEPTH + 1e-3, MAX_DEPTH - 1e-3).astype(np.float32)
    return Rendered(rgb=rgb8, seg=seg, depth=depth, masks=masks)
