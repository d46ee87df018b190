"""The dense finetune on Ray Train workers through the one runner (2 CPU workers, gloo DDP)."""
from __future__ import annotations

import json

import pytest
from dense_files import write_ade

from clipdense.config import DataError, load_config
from clipdense.dense import FinetuneConfig, run

BASE = ["task=seg", "data.num_classes=3", "data.batch_size=4", "data.crop_size=[32,32]", "data.scale=[64,32]",
        "data.photometric=false", "head.channels=16", "head.aux_channels=8", "eval.mode=whole", "eval.test_scale=null",
        "train.schedule.total_steps=4", "train.schedule.warmup_steps=1", "train.log_every=2",
        "train.scaling.num_workers=2", "train.scaling.cpus_per_worker=1"]


@pytest.mark.slow
def test_seg_on_two_ray_train_workers(ray_local, tmp_path):
    root = tmp_path / "ade"
    write_ade(root, n_train=8, n_val=2, size=(32, 48), num_classes=3)
    out = tmp_path / "run"
    result = run(load_config(FinetuneConfig, None, BASE + [f"data.root={root}", f"out_dir={out}"]))
    record = json.loads((out / "metrics.json").read_text())
    assert record["train"]["steps"] == 4 and record["metrics"]["images"] == 2
    assert result["metrics"]["eval/mIoU"] == pytest.approx(record["metrics"]["mIoU"])
    assert record["config"]["train"]["scaling"]["num_workers"] == 2


@pytest.mark.slow
def test_bad_annotation_inside_a_ray_worker_is_one_line(ray_local, tmp_path):
    from PIL import Image

    root = tmp_path / "ade"
    base = write_ade(root, n_train=4, n_val=1, size=(32, 32), num_classes=3)
    bad = base / "annotations" / "training" / "ADE_train_00000002.png"
    Image.new("L", (8, 8)).save(bad)
    with pytest.raises(DataError) as e:
        run(load_config(FinetuneConfig, None, BASE + [f"data.root={root}", f"out_dir={tmp_path / 'run'}"]))
    assert "\n" not in str(e.value) and str(bad) in str(e.value)
