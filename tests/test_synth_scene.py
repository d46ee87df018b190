"""Shapes world core: scene sampling, rendering (occlusion, depth cues), captions, config presets."""
from __future__ import annotations

import numpy as np
import pytest

from clipdense.config import ConfigError, configs_dir, load_config
from clipdense.synth import CLASSES, COLOURS, K, SynthConfig, captions, render, scene
from clipdense.synth.scene import MAX_DEPTH, MIN_DEPTH, Obj, Scene


def _scenes(n: int, seed: int = 0) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [scene.sample_scene(rng) for _ in range(n)]


def test_sample_scene_is_deterministic_and_valid():
    a, b = _scenes(20, seed=5), _scenes(20, seed=5)
    assert a == b
    assert a != _scenes(20, seed=6)
    for s in a:
        assert 1 <= len(s.objects) <= 4
        pairs = [(o.colour, o.shape) for o in s.objects]
        assert len(set(pairs)) == len(pairs)  # "the blue star" names one object
        for o in s.objects:
            assert o.shape in CLASSES and o.colour in COLOURS
            assert MIN_DEPTH < o.depth < s.background.wall_depth_at(o.x)


def test_each_class_has_its_typical_colour_at_the_set_rate():
    objs = [o for s in _scenes(1500, seed=2) for o in s.objects]
    for cls in CLASSES:
        mine = [o.colour for o in objs if o.shape == cls]
        typical = np.mean([c == scene.TYPICAL_COLOUR[cls] for c in mine])
        assert abs(typical - scene.P_TYPICAL) < 0.06, (cls, typical)
        # the other colours share the rest evenly: each appears, none dominates
        others = [c for c in mine if c != scene.TYPICAL_COLOUR[cls]]
        counts = np.array([others.count(c) for c in COLOURS if c != scene.TYPICAL_COLOUR[cls]])
        assert counts.min() > 0.5 * counts.mean()
    assert len(set(scene.TYPICAL_COLOUR.values())) == len(CLASSES)


def test_render_outputs_and_ranges():
    s = _scenes(1, seed=3)[0]
    r = render.render(s, 128)
    assert r.rgb.shape == (128, 128, 3) and r.rgb.dtype == np.uint8
    assert r.seg.shape == (128, 128) and r.seg.dtype == np.uint8
    assert r.depth.dtype == np.float32 and MIN_DEPTH < r.depth.min() and r.depth.max() < MAX_DEPTH
    assert r.masks.shape == (len(s.objects), 128, 128) and r.masks.dtype == bool
    assert set(np.unique(r.seg)) <= set(range(K + 1))
    # Visible masks are disjoint, carry their object's label and depth, and cover all labelled pixels.
    assert r.masks.sum(axis=0).max() <= 1
    for o, m in zip(s.objects, r.masks):
        assert m.any()
        assert (r.seg[m] == o.label).all()
        assert np.allclose(r.depth[m], o.depth)
    assert ((r.seg > 0) == r.masks.any(axis=0)).all()
    # Same scene, other size: same content, resolution-independent scene description.
    assert render.render(s, 64).seg.shape == (64, 64)


def _two_circles(depth_left: float, depth_right: float) -> Scene:
    bg = scene.sample_background(np.random.default_rng(0))
    left = Obj("circle", "red", "large", x=0.42, y=0.5, radius=0.15, depth=depth_left, rgb=COLOURS["red"])
    right = Obj("square", "blue", "large", x=0.58, y=0.5, radius=0.15, depth=depth_right, rgb=COLOURS["blue"])
    return Scene(objects=(left, right), background=bg)


@pytest.mark.parametrize("left_nearer", [True, False])
def test_occlusion_nearer_object_wins(left_nearer):
    near, far = 1.5, 3.0
    s = _two_circles(near if left_nearer else far, far if left_nearer else near)
    r = render.render(s, 100)
    row, col = 50, 50  # covered by both objects
    winner = s.objects[0] if left_nearer else s.objects[1]
    assert r.seg[row, col] == winner.label
    assert r.depth[row, col] == pytest.approx(winner.depth)
    assert r.masks[0 if left_nearer else 1, row, col] and not r.masks[1 if left_nearer else 0, row, col]
    rgb = r.rgb[row, col].astype(int)
    assert (rgb[0] > rgb[2]) if left_nearer else (rgb[2] > rgb[0])  # red circle vs blue square on top


def test_depth_is_predictable_from_image_cues():
    objs = [o for s in _scenes(60, seed=1) for o in s.objects]
    depth = np.array([o.depth for o in objs])
    # Same physical size: apparent size falls with depth; all objects: lower in the image = nearer.
    for size in ("small", "large"):
        sel = [i for i, o in enumerate(objs) if o.size == size]
        assert np.corrcoef(depth[sel], [objs[i].radius for i in sel])[0, 1] < -0.8
    contact = np.array([o.y + o.radius * 0.92 for o in objs])
    assert np.corrcoef(1 / depth, contact)[0, 1] > 0.8  # across rooms (camera height/pitch vary)
    for s in _scenes(20, seed=1):  # within a room, exact: each object stands on the floor at its depth
        for o in s.objects:
            bg = s.background
            assert o.y + o.radius * 0.92 == pytest.approx(bg.horizon + bg.floor_k / o.depth)
    # Background: the floor recedes towards the horizon (depth never grows going down a column).
    r = render.render(_scenes(1, seed=2)[0], 96)
    for col in (0, 48, 95):
        d_bg = r.depth[r.seg[:, col] == 0, col]
        assert (np.diff(d_bg) <= 1e-4).all()
        assert d_bg[0] > 2 * d_bg[-1]


def test_alt_text_mentions_at_most_one_object_with_realistic_noise():
    rng = np.random.default_rng(0)
    mentions = wrong = 0
    n = 600
    for s in _scenes(n, seed=9):
        text, info = captions.alt_text_with_info(s, rng)
        assert len(captions.mentioned_classes(text)) <= 1, text
        assert len(captions.mentioned_colours(text)) <= 1, text
        if info["mentioned"] is None:
            assert captions.mentioned_classes(text) == []
        else:
            mentions += 1
            obj = s.objects[info["mentioned"]]
            assert captions.mentioned_classes(text) == [obj.shape]
            said = captions.mentioned_colours(text)[0]
            assert (said == obj.colour) == info["colour_correct"]
            wrong += not info["colour_correct"]
    assert 0.42 < mentions / n < 0.58
    assert 0.3 < wrong / mentions < 0.5


def test_filler_vocabulary_never_names_a_shape_or_colour():
    for phrase in captions._FILLERS + captions._PRODUCTS + captions._NOUNS:
        assert captions.mentioned_classes(phrase) == [], phrase
        assert captions.mentioned_colours(phrase) == [], phrase


def test_describe_names_every_object_and_occlusion():
    for s in _scenes(100, seed=4):
        text = captions.describe(s).lower()
        for o in s.objects:
            assert f"{o.size} {o.colour} {o.shape}" in text
    text = captions.describe(_two_circles(1.5, 3.0))
    assert text.startswith("A large red circle") and "in front of the blue square" in text
    assert "in front of the red circle" not in text
    text = captions.describe(_two_circles(3.0, 1.5))
    assert text.startswith("A large blue square") and "in front of the red circle" in text
    assert "in front of the blue square" not in text


def test_position_phrase():
    at = lambda x, y: captions.position_phrase(Obj("ring", "red", "small", x, y, 0.05, 2.0))  # noqa: E731
    assert at(0.1, 0.9) == "at the bottom left"
    assert at(0.5, 0.5) == "in the center"
    assert at(0.9, 0.5) == "at the right"
    assert at(0.5, 0.1) == "at the top"


def test_config_presets_overrides_and_errors(tmp_path):
    for name in ("tiny", "demo"):
        cfg = load_config(SynthConfig, configs_dir() / "synth" / f"{name}.yaml", [f"out={tmp_path}"])
        assert cfg.preset == name
    demo = SynthConfig(out="x", preset="demo").resolved()
    assert 20000 <= demo["web_images"] <= 30000 and demo["curated_images"] == round(demo["web_images"] * 0.05)
    tiny = SynthConfig(out="x", ade_train=5, curated_fraction=0.5).resolved()
    assert tiny["ade_train"] == 5 and tiny["curated_images"] == 64 and tiny["web_images"] == 128
    with pytest.raises(ConfigError, match="ade_trian"):
        load_config(SynthConfig, None, ["out=x", "ade_trian=3"])
    with pytest.raises(ConfigError, match="preset"):
        load_config(SynthConfig, None, ["out=x", "preset=huge"])
    with pytest.raises(ConfigError, match="shard_size"):
        load_config(SynthConfig, None, ["out=x", "shard_size=0"])
