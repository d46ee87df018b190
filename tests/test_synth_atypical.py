"""Caption quality on atypically coloured objects: bound colour+shape accuracy and the colour-prior error, on
hand-built scenes with known answers, on the world's own captions (true descriptions name every object right; a
captioner that names the colour's prior shape is all prior error), and over caption folders of a tiny world."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipdense.synth import SynthConfig, run
from clipdense.synth.captions import describe
from clipdense.synth.oracle import write_oracle_captions
from clipdense.synth.scene import TYPICAL_COLOUR, sample_scene
from clipdense.synth.scoring import (
    PRIOR_SHAPE,
    atypical_counts,
    caption_accuracy,
    names_pair,
    read_world_texts,
    score_caption_sources,
    score_captions,
    score_texts,
)

ZERO_DENSE = dict(ade_train=0, ade_val=0, nyu_train=0, nyu_test=0, coco_train=0, coco_val=0)
ORIGINAL_KEYS = {"images_scored", "alt_text_accuracy", "synthetic_accuracy", "alt_text_colour_recall",
                 "synthetic_colour_recall", "alt_text_shape_recall", "synthetic_shape_recall"}


def obj(colour: str, shape: str) -> dict:
    return {"colour": colour, "shape": shape}


# red square: atypical, its prior pair "red circle" absent (eligible); blue square typical
ONE = {"objects": [obj("red", "square"), obj("blue", "square")]}
# green star: atypical but "green triangle" is in the scene (not eligible); purple ring: atypical, eligible
TWO = {"objects": [obj("green", "star"), obj("green", "triangle"), obj("purple", "ring")]}


def prior_caption(scene: dict) -> str:
    """A captioner that reads only colour: every object named by the shape its colour suggests."""
    return " and ".join(f"a {o['colour']} {PRIOR_SHAPE[o['colour']]}" for o in scene["objects"])


def test_prior_shape_inverts_the_typical_colours():
    assert PRIOR_SHAPE["red"] == "circle" and PRIOR_SHAPE["purple"] == "cross"
    assert all(TYPICAL_COLOUR[PRIOR_SHAPE[c]] == c for c in PRIOR_SHAPE)


def test_names_pair_is_whole_adjacent_words():
    assert names_pair("A Red Squares sticker", "red", "square")
    assert not names_pair("a covered square", "red", "square")  # the substring score would count this
    assert caption_accuracy("a covered square", {"objects": [obj("red", "square")]}) == 1.0
    assert not names_pair("a red big square", "red", "square") and not names_pair("", "red", "square")


@pytest.mark.parametrize("scene,text,expected", [
    (ONE, "A red circle and a blue square.", [1, 0, 1, 1]),
    (ONE, "a red squares, blue square, red circle", [1, 1, 1, 1]),  # named right and by its prior: both count
    (ONE, "a blue square", [1, 0, 1, 0]),
    (TWO, "a green triangle, a green star and a purple cross", [2, 1, 1, 1]),  # green triangle is really there
    ({"objects": [obj("red", "circle")]}, "a red circle", [0, 0, 0, 0]),
])
def test_atypical_counts_on_hand_built_scenes(scene, text, expected):
    assert atypical_counts(text, scene).tolist() == expected


def test_score_texts_pools_objects_and_averages_an_images_captions():
    texts = {"a": ["A red circle and a blue square.", "a red square and a blue square"],
             "b": ["a green triangle, a green star and a purple cross"], "missing": ["x"]}
    scores = score_texts({"a": ONE, "b": TWO}, texts, "src")
    # atypical objects 1 + 2, bound 0.5 + 1; eligible 1 + 1, prior 0.5 + 1
    assert scores["src_atypical_accuracy"] == pytest.approx(1.5 / 3)
    assert scores["src_atypical_prior_error"] == pytest.approx(1.5 / 2)
    assert scores["src_accuracy"] == pytest.approx(((0.5 + 1.0) / 2 + 2 / 3) / 2)
    assert score_texts({"a": ONE}, {"a": []}, "e") == {"e_accuracy": 0.0, "e_colour_recall": 0.0,
                                                       "e_shape_recall": 0.0, "e_atypical_accuracy": 0.0,
                                                       "e_atypical_prior_error": 0.0}


def test_true_descriptions_are_exact_and_a_colour_only_captioner_is_all_prior_error():
    rng = np.random.default_rng(0)
    scenes = {str(i): s for i, s in enumerate(sample_scene(rng) for _ in range(200))}
    dicts = {k: s.to_dict() for k, s in scenes.items()}
    truth = score_texts(dicts, {k: [describe(s)] for k, s in scenes.items()}, "true")
    assert truth["true_atypical_accuracy"] == 1.0 and truth["true_atypical_prior_error"] == 0.0
    prior = score_texts(dicts, {k: [prior_caption(d)] for k, d in dicts.items()}, "prior")
    assert prior["prior_atypical_accuracy"] == 0.0 and prior["prior_atypical_prior_error"] == 1.0
    # ... although overall it names most objects right: the typical colour is the common one
    assert 0.45 < prior["prior_accuracy"] < 0.75


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("atypical") / "w"
    run(SynthConfig(out=str(out), workers=1, web_images=64, shard_size=32, curated_fraction=0.0, **ZERO_DENSE))
    return out


def write_folder(folder: Path, captions: dict[str, list[str]]) -> Path:
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"key": list(captions), "syn_captions": list(captions.values())}),
                   folder / "00000.parquet")
    return folder


def test_score_caption_sources_scores_every_source_on_the_same_images(world, tmp_path):
    scenes, _, truths = read_world_texts(world / "web")
    assert len(scenes) == 64 and all(truths[k][0].endswith(".") for k in scenes)
    keys = sorted(scenes)[1:]  # one image without synthetic captions: scored by no source
    colour_only = write_folder(tmp_path / "syn", {k: [prior_caption(scenes[k])] * 2 for k in keys})
    write_oracle_captions(world / "web", tmp_path / "oracle", 2, seed=0)
    q = score_caption_sources(world / "web", {"synthetic": colour_only, "oracle": tmp_path / "oracle"})
    assert q["images_scored"] == 63 and q["atypical_objects"] >= q["atypical_prior_eligible"] > 5
    for source in ("true", "oracle"):
        assert q[f"{source}_atypical_accuracy"] == 1.0 and q[f"{source}_atypical_prior_error"] == 0.0
        assert q[f"{source}_accuracy"] == 1.0
    assert q["synthetic_atypical_accuracy"] == 0.0 and q["synthetic_atypical_prior_error"] == 1.0
    # alt text names at most one object, with its colour wrong 40% of the time
    assert q["alt_text_atypical_accuracy"] < 0.5 and q["alt_text_atypical_prior_error"] < 0.2
    plain = score_captions(world / "web", colour_only)
    assert ORIGINAL_KEYS <= set(plain) and plain["synthetic_accuracy"] == q["synthetic_accuracy"]
    assert {k for k in plain if "atypical" in k} >= {"alt_text_atypical_accuracy", "synthetic_atypical_accuracy",
                                                     "true_atypical_accuracy", "true_atypical_prior_error"}
