"""Dense dataset readers on files in the exact on-disk layouts: subsets, label conventions, augmentation, errors."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from dense_files import write_ade, write_coco, write_nyu
from PIL import Image

from clipdense.config import DataError, UserError
from clipdense.dense.dataset_common import subset_indices
from clipdense.dense.tasks.depth.dataset import NYUEval, NYUTrain
from clipdense.dense.tasks.det.dataset import COCODetection
from clipdense.dense.tasks.seg.dataset import ADEEval, ADETrain, reduce_zero_label, restore_zero_label


def test_subsets_are_nested_deterministic_and_sized():
    eighth, quarter, half = (set(subset_indices(100, f, seed=3)) for f in (1 / 8, 1 / 4, 1 / 2))
    assert len(eighth) == math.ceil(100 / 8) and len(quarter) == 25
    assert eighth < quarter < half
    assert subset_indices(100, 0.25, seed=3) == subset_indices(100, 0.25, seed=3)
    assert subset_indices(100, 0.25, seed=3) != subset_indices(100, 0.25, seed=4)
    assert subset_indices(7, 1.0, seed=0) == list(range(7))
    assert len(subset_indices(5, 0.01, seed=0)) == 1


def test_reduce_zero_label_roundtrip():
    raw = np.array([0, 1, 2, 150, 255], np.uint8)
    assert reduce_zero_label(raw).tolist() == [255, 0, 1, 149, 255]
    assert restore_zero_label(np.array([0, 1, 149], np.uint8)).tolist() == [1, 2, 150]


def test_ade_reader_train_and_eval(tmp_path):
    base = write_ade(tmp_path, n_train=8, n_val=2, size=(40, 56), num_classes=3)
    train = ADETrain(tmp_path, num_classes=3, crop=(32, 32), scale=(64, 32), photometric_aug=True)
    item = train[(0, 0)]
    assert item["img"].shape == (3, 32, 32) and item["img"].dtype == torch.uint8
    assert set(item["label"].unique().tolist()) <= {0, 1, 2, 255}
    assert torch.equal(train[(1, 0)]["img"], train[(1, 0)]["img"])  # augmentation is a function of (index, epoch)
    assert not torch.equal(train[(1, 0)]["img"], train[(1, 1)]["img"])
    ev = ADEEval(tmp_path, num_classes=3, test_scale=None)
    raw = np.asarray(Image.open(base / "annotations" / "validation" / ev.pairs[0][1].name))
    assert ev[0]["label"].numpy().tolist() == reduce_zero_label(raw).tolist()
    assert ev[0]["name"] == "ADE_val_00000001.png"
    assert ADEEval(base, num_classes=3, test_scale=(64, 20))[0]["img"].shape[-2:] == (20, 28)  # keep-ratio resize
    quarter = ADETrain(tmp_path, num_classes=3, fraction=0.25, subset_seed=1)
    half = ADETrain(tmp_path, num_classes=3, fraction=0.5, subset_seed=1)
    assert len(quarter) == 2 and set(quarter.pairs) < set(half.pairs)


def _one_line(err: pytest.ExceptionInfo, *needles: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg


def test_ade_bad_annotations_name_the_file(tmp_path):
    base = write_ade(tmp_path, n_train=2, n_val=1, size=(32, 32), num_classes=3)
    ann = base / "annotations" / "training" / "ADE_train_00000001.png"
    Image.fromarray(np.zeros((16, 32), np.uint8)).save(ann)  # wrong size
    ds = ADETrain(tmp_path, num_classes=3)
    with pytest.raises(DataError) as e:
        ds[(0, 0)]
    _one_line(e, str(ann), "does not match")
    Image.fromarray(np.full((32, 32), 9, np.uint8)).save(ann)  # label 9 > 3 classes
    with pytest.raises(UserError) as e:
        ds[(0, 0)]
    _one_line(e, str(ann), "label 9")
    (base / "annotations" / "training" / "ADE_train_00000002.png").unlink()
    with pytest.raises(DataError) as e:
        ADETrain(tmp_path, num_classes=3)
    _one_line(e, "ADE_train_00000002.png", "missing")


def test_nyu_reader(tmp_path):
    write_nyu(tmp_path, n_train=4, n_test=2, size=(40, 48))
    train = NYUTrain(tmp_path, "nyudepthv2_train_files_with_gt.txt", crop=(32, 32))
    item = train[(0, 0)]
    assert item["img"].shape == (3, 32, 32) and item["depth"].shape == (32, 32)
    ev = NYUEval(tmp_path, "nyudepthv2_test_files_with_gt.txt")
    d = ev[0]["depth"].numpy()
    raw = np.asarray(Image.open(tmp_path / ev[0]["name"]))
    assert raw.dtype == np.uint16 and np.allclose(d, raw / 1000.0)
    assert ev[0]["name"].startswith("test/") and d.max() > 3.0  # metres, not millimetres
    padded = NYUTrain(tmp_path, "nyudepthv2_train_files_with_gt.txt", crop=(64, 64))[(0, 0)]
    assert padded["depth"].shape == (64, 64) and float(padded["depth"][50:].max()) == 0.0  # pad = invalid depth


def test_nyu_bad_inputs_name_the_file(tmp_path):
    write_nyu(tmp_path, n_train=2, n_test=1, size=(32, 32))
    lst = tmp_path / "nyudepthv2_train_files_with_gt.txt"
    lst.write_text(lst.read_text() + "just_one_field\n")
    with pytest.raises(DataError) as e:
        NYUTrain(tmp_path, lst.name)
    _one_line(e, f"{lst}:3")
    first = (tmp_path / "nyudepthv2_test_files_with_gt.txt").read_text().split()[1]
    Image.fromarray(np.zeros((8, 8), np.uint16)).save(tmp_path / first.lstrip("/"))
    with pytest.raises(DataError) as e:
        NYUEval(tmp_path, "nyudepthv2_test_files_with_gt.txt")[0]
    _one_line(e, first.lstrip("/"), "does not match")


def test_coco_reader_maps_categories(tmp_path):
    write_coco(tmp_path, n_train=4, n_val=2, size=(48, 48))
    ds = COCODetection(tmp_path, "val2017", train=False)
    doc = json.loads((tmp_path / "annotations" / "instances_val2017.json").read_text())
    assert ds.num_classes == 3 and ds.cat_ids == [1, 3, 7]
    t = ds[0]["target"]
    anns = [a for a in doc["annotations"] if a["image_id"] == ds.image_ids[0]]
    assert t["labels"].tolist() == [[1, 3, 7].index(a["category_id"]) + 1 for a in anns]
    x, y, w, h = anns[0]["bbox"]
    assert t["boxes"][0].tolist() == [x, y, x + w, y + h]
    flipped = [COCODetection(tmp_path, "train2017", train=True, aug_seed=s)[(0, 0)]["target"]["boxes"]
               for s in range(6)]
    assert any(not torch.equal(flipped[0], b) for b in flipped[1:])  # random horizontal flip happens


def test_coco_bad_annotations_name_file_and_id(tmp_path):
    write_coco(tmp_path, n_train=2, n_val=1, size=(32, 32))
    path = tmp_path / "annotations" / "instances_train2017.json"
    doc = json.loads(path.read_text())
    doc["annotations"][0]["category_id"] = 99
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError) as e:
        COCODetection(tmp_path, "train2017", train=True)
    _one_line(e, str(path), f"annotation {doc['annotations'][0]['id']}", "category_id 99")
    doc["annotations"][0]["category_id"] = 1
    doc["annotations"][0]["bbox"] = [20.0, 20.0, 30.0, 5.0]  # runs past the 32 px image
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError) as e:
        COCODetection(tmp_path, "train2017", train=True)
    _one_line(e, str(path), "outside image")
    doc = json.loads((tmp_path / "annotations" / "instances_val2017.json").read_text())
    img = tmp_path / "val2017" / doc["images"][0]["file_name"]
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(img)
    with pytest.raises(DataError) as e:
        COCODetection(tmp_path, "val2017", train=False)[0]
    _one_line(e, str(img), "does not match")
