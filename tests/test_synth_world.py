"""`clipdense synth --preset tiny`: all five datasets in their exact on-disk layouts, deterministic bytes."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipdense.config import ConfigError
from clipdense.synth import CLASSES, K, SynthConfig, captions, render, run
from clipdense.synth.scene import TYPICAL_COLOUR, sample_scene
from clipdense.synth.writers import Job, image_rng

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.mask")
ZERO_DENSE = dict(ade_train=0, ade_val=0, nyu_train=0, nyu_test=0, coco_train=0, coco_val=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "tiny"
    summary = run(SynthConfig(out=str(out), preset="tiny", seed=0, workers=1))
    return out, summary


def _tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        names = tar.getnames()
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    # webdataset needs a sample's members to be consecutive
    keys = [n.split(".", 1)[0] for n in names]
    assert keys == sorted(keys)
    return samples


def test_summary_counts_and_paths(tiny):
    out, summary = tiny
    c = summary["counts"]
    assert (c["web"], c["curated"], c["ade_train"], c["ade_val"]) == (128, 16, 32, 16)
    assert (c["nyu_train"], c["nyu_test"], c["coco_train"], c["coco_val"]) == (32, 16, 32, 16)
    assert all(Path(p).exists() for p in summary["paths"].values())
    assert summary["seconds"] > 0
    assert 0.3 < summary["alt_stats"]["mentions_true_object"] < 0.7
    classes = json.loads((out / "classes.json").read_text())
    assert classes["classes"] == list(CLASSES) and classes["labels"]["0"] == "background"


def test_web_shards_img2dataset_layout_and_alt_text(tiny):
    out, _ = tiny
    assert sorted(p.name for p in (out / "web").glob("*.tar")) == ["00000.tar", "00001.tar"]
    assert (out / "web" / "00000_stats.json").exists()
    samples = _tar_samples(out / "web" / "00001.tar")
    assert len(samples) == 64 and all(set(s) == {"jpg", "txt", "json"} for s in samples.values())
    assert min(samples) == "000010000"
    for key, s in samples.items():
        img = Image.open(io.BytesIO(s["jpg"]))
        assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (96, 96))
        meta = json.loads(s["json"])
        alt = s["txt"].decode()
        assert meta["key"] == key and meta["caption"] == alt and meta["status"] == "success"
        for o in meta["scene"]["objects"]:  # ground truth for scoring rides along in the json
            assert f"{o['colour']} {o['shape']}" in meta["description"].lower()
        assert len(captions.mentioned_classes(alt)) <= 1
        if meta["alt"]["mentioned"] is not None:
            truth = meta["scene"]["objects"][meta["alt"]["mentioned"]]
            assert captions.mentioned_classes(alt) == [truth["shape"]]
        assert alt != meta["description"]


def test_curated_captions_describe_every_object(tiny):
    out, _ = tiny
    samples = _tar_samples(out / "curated" / "00000.tar")
    assert len(samples) == 16
    for s in samples.values():
        text = s["txt"].decode().lower()
        objects = json.loads(s["json"])["scene"]["objects"]
        assert objects
        for o in objects:
            assert f"{o['colour']} {o['shape']}" in text
        assert len(captions.mentioned_classes(text)) >= len(objects)
    # Curated scenes are separate draws, not copies of web images.
    web_jpgs = {s["jpg"] for s in _tar_samples(out / "web" / "00000.tar").values()}
    assert not web_jpgs & {s["jpg"] for s in samples.values()}


def test_ade_layout(tiny):
    out, _ = tiny
    root = out / "ade" / "ADEChallengeData2016"
    for split, prefix, n in [("training", "ADE_train_", 32), ("validation", "ADE_val_", 16)]:
        images = sorted((root / "images" / split).glob("*.jpg"))
        labels = sorted((root / "annotations" / split).glob("*.png"))
        assert [p.name for p in images][:2] == [f"{prefix}00000001.jpg", f"{prefix}00000002.jpg"]
        assert len(images) == n and [p.stem for p in labels] == [p.stem for p in images]
        seen = set()
        for p in labels[:8]:
            lab = Image.open(p)
            assert lab.mode == "L" and lab.size == (128, 128)
            arr = np.asarray(lab)
            assert arr.dtype == np.uint8 and arr.max() <= K
            seen |= set(np.unique(arr).tolist())
        assert 0 in seen and len(seen) > 2
    rows = (root / "objectInfo.csv").read_text().splitlines()
    assert rows[0] == "Idx,Ratio,Train,Val,Name" and [r.split(",")[-1] for r in rows[1:]] == list(CLASSES)


def test_ade_validation_has_the_atypical_mask_of_each_annotation(tiny):
    """1 exactly on the visible pixels of objects whose colour is not their class's typical one."""
    out, _ = tiny
    root = out / "ade" / "ADEChallengeData2016"
    assert not (root / "atypical" / "training").exists()
    labels = sorted((root / "annotations" / "validation").glob("*.png"))
    masks = sorted((root / "atypical" / "validation").glob("*.png"))
    assert [p.name for p in masks] == [p.name for p in labels] and len(masks) == 16
    job = Job("ade", "val", 0, 0, 16, str(out), 0, 128, 90, 4)
    atypical_pixels = typical_pixels = 0
    for index, (label_file, mask_file) in enumerate(zip(labels, masks)):
        mask_png, label = Image.open(mask_file), np.asarray(Image.open(label_file))
        assert mask_png.mode == "L"
        mask = np.asarray(mask_png)
        assert mask.dtype == np.uint8 and set(np.unique(mask).tolist()) <= {0, 1}
        assert not (mask.astype(bool) & (label == 0)).any(), "only object pixels"
        scene = sample_scene(image_rng(job, index), job.max_objects)
        rendered = render.render(scene, job.size)
        assert np.array_equal(rendered.seg, label)
        expected = np.zeros_like(label, dtype=bool)
        for o, visible in zip(scene.objects, rendered.masks):
            if o.colour != TYPICAL_COLOUR[o.shape]:
                expected |= visible
        assert np.array_equal(mask.astype(bool), expected)
        atypical_pixels += int(mask.sum())
        typical_pixels += int(((label > 0) & (mask == 0)).sum())
    assert atypical_pixels > 0 and typical_pixels > 0


def test_nyu_test_rooms_hold_the_set_number_of_frames(tiny, tmp_path):
    _, summary = tiny
    assert (summary["counts"]["nyu_train_rooms"], summary["counts"]["nyu_test_rooms"]) == (2, 1)
    out = tmp_path / "rooms"
    small = run(SynthConfig(out=str(out), workers=1, web_images=0, curated_fraction=0.0, nyu_test_frames_per_room=3,
                            **{**ZERO_DENSE, "nyu_test": 8}))
    lines = (out / "nyu" / "nyudepthv2_test_files_with_gt.txt").read_text().splitlines()
    rooms = [line.split("/")[2] for line in lines]
    assert small["counts"]["nyu_test_rooms"] == len(set(rooms)) == 3 and len(lines) == 8
    assert [rooms.count(r) for r in sorted(set(rooms))] == [3, 3, 2]


def test_nyu_bts_layout(tiny):
    out, _ = tiny
    for fname, top, n in [("nyudepthv2_train_files_with_gt.txt", "sync", 32),
                          ("nyudepthv2_test_files_with_gt.txt", "test", 16)]:
        lines = (out / "nyu" / fname).read_text().splitlines()
        assert len(lines) == n
        for line in lines[:: max(1, n // 6)]:
            rgb_rel, depth_rel, focal = line.split(" ")
            assert rgb_rel.startswith(f"/{top}/scene_") and float(focal) > 0
            assert Path(rgb_rel).name.startswith("rgb_") and Path(depth_rel).name.startswith("sync_depth_")
            rgb = Image.open(out / "nyu" / rgb_rel.lstrip("/"))
            depth = Image.open(out / "nyu" / depth_rel.lstrip("/"))
            assert rgb.mode == "RGB" and rgb.size == (128, 128)
            assert depth.mode == "I;16" and depth.size == (128, 128)
            mm = np.asarray(depth)
            assert mm.dtype == np.uint16 and 500 < mm.min() and mm.max() < 9500
            assert mm.max() - mm.min() > 1000  # a receding room, not a flat plane


def test_coco_instances(tiny):
    from pycocotools.coco import COCO

    out, summary = tiny
    for split, n in [("train", 32), ("val", 16)]:
        coco = COCO(str(out / "coco" / "annotations" / f"instances_{split}2017.json"))
        assert [c["id"] for c in coco.loadCats(coco.getCatIds())] == list(range(1, K + 1))
        assert len(coco.getImgIds()) == n
        anns = coco.loadAnns(coco.getAnnIds())
        assert len(anns) == summary["counts"][f"coco_{split}_annotations"] >= n
        for a in anns:
            img = coco.imgs[a["image_id"]]
            assert (out / "coco" / f"{split}2017" / img["file_name"]).exists()
            x, y, w, h = a["bbox"]
            assert 0 <= x and 0 <= y and x + w <= img["width"] and y + h <= img["height"] and w > 0 and h > 0
            assert a["iscrowd"] == 0 and 1 <= a["category_id"] <= K
            mask = coco.annToMask(a)
            assert mask.sum() == a["area"]
            ys, xs = np.nonzero(mask)
            assert [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1] == a["bbox"]


def test_same_seed_same_bytes_any_workers_and_seed_changes_them(tiny, tmp_path):
    out, _ = tiny
    # Same seed, 2 processes, different dataset sizes: the shared shards and images are byte-identical.
    again = tmp_path / "again"
    run(SynthConfig(out=str(again), seed=0, workers=2, web_images=64, ade_train=4, **{
        k: v for k, v in ZERO_DENSE.items() if k != "ade_train"}))
    assert (again / "web" / "00000.tar").read_bytes() == (out / "web" / "00000.tar").read_bytes()
    name = "ADE_train_00000004.png"
    ann = Path("ade/ADEChallengeData2016/annotations/training") / name
    assert (again / ann).read_bytes() == (out / ann).read_bytes()
    other = tmp_path / "other"
    run(SynthConfig(out=str(other), seed=1, workers=1, web_images=64, **ZERO_DENSE))
    assert (other / "web" / "00000.tar").read_bytes() != (out / "web" / "00000.tar").read_bytes()


def test_rerun_replaces_own_output_and_refuses_foreign_dirs(tmp_path):
    out = tmp_path / "w"
    run(SynthConfig(out=str(out), workers=1, web_images=8, shard_size=4, curated_fraction=0.0, **ZERO_DENSE))
    assert len(list((out / "web").glob("*.tar"))) == 2
    summary = run(SynthConfig(out=str(out), workers=1, web_images=4, shard_size=4, curated_fraction=0.0,
                              **ZERO_DENSE))
    assert len(list((out / "web").glob("*.tar"))) == 1 and summary["counts"]["web"] == 4
    foreign = tmp_path / "foreign"
    (foreign / "coco").mkdir(parents=True)
    with pytest.raises(ConfigError, match="not written by clipdense synth"):
        run(SynthConfig(out=str(foreign), workers=1, web_images=4, **ZERO_DENSE))
    assert (foreign / "coco").exists()
