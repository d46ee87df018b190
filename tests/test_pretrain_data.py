"""Pretrain data: shards joined with recaption Parquet by key; bad rows skipped and counted; batch collation."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from pretrain_files import write_world

from clipdense.config import build_config
from clipdense.data.shards import SCHEMA
from clipdense.data.storage import Storage
from clipdense.pretrain import PretrainConfig
from clipdense.pretrain.batches import Collate
from clipdense.pretrain.data import build_datasets, join_recaptions
from clipdense.pretrain.run import row_sources

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_world(tmp_path_factory.mktemp("world"), n_shards=2, per_shard=24, bad=True)


def _cfg(world, **kw) -> PretrainConfig:
    data = {"data": {"shards": world["shards"], "recaptions": world["recaptions"], "batch_size": 8},
            "captions": {"policy": "both"}, "eval": {"holdout": 6}, "ray": {"in_process": True}}
    data.update(kw)
    return build_config(PretrainConfig, data)


def _datasets(cfg: PretrainConfig, image_size: int):
    return build_datasets(*row_sources(cfg.data, cfg.eval, cfg.captions.policy), cfg.data, cfg.eval, image_size)


def test_join_records_every_problem_in_error(world):
    shard = f"{world['shards']}/00000.tar"
    rows = [{"key": f"00000{i:04d}", "image_bytes": b"x", "caption": "web", "syn_captions": None, "meta": None,
             "error_code": None, "error": None, "shard": shard} for i in range(4)]
    rows.append({**rows[0], "key": "nope", "shard": f"{world['shards']}/00009.tar"})
    out = join_recaptions(pa.Table.from_pylist(rows, schema=SCHEMA), Storage(world["recaptions"]), "both").to_pylist()
    assert out[0]["error_code"] is None and len(out[0]["syn_captions"]) == 3
    # the recaption files are in the old format (`error` string alone): still read, by code
    assert (out[1]["error_code"], out[1]["error"]) == ("recaption_failed", "engine_failed: engine failed")
    assert out[2]["error_code"] == "no_recaption_for_key"
    assert out[4]["error_code"] == "no_recaption_file" and out[4]["error"].endswith("recap/00009.parquet")
    # without recaptions, `both` needs synthetic captions the shard rows do not have
    alone = join_recaptions(pa.Table.from_pylist(rows[:1], schema=SCHEMA), None, "both").to_pylist()
    assert alone[0]["error_code"] == "no_synthetic_captions"
    real = join_recaptions(pa.Table.from_pylist(rows[:1], schema=SCHEMA), None, "real").to_pylist()[0]
    assert real["error_code"] is None and real["error"] is None


def test_build_datasets_skips_and_counts_bad_rows(ray_local, world):
    train, eval_ds, counts = _datasets(_cfg(world), image_size=32)
    assert counts["rows"] == 48 and counts["ok"] == 45
    assert counts["errors"] == {"recaption_failed": 1, "no_recaption_for_key": 1, "undecodable_image": 1}
    assert counts["holdout_rows"] == counts["eval_rows"] == 6
    rows = train.take_all()
    eval_keys = {r["key"] for r in eval_ds.take_all()}
    assert len(rows) == 45 - 6 and not eval_keys & {r["key"] for r in rows}
    # training rows: the whole 48x48 image (the crop is drawn in the collate, on the original geometry); eval rows:
    # open_clip's eval geometry, already at the model's size
    assert rows[0]["pixels"].shape == (48, 48, 3) and rows[0]["pixels"].dtype == np.uint8
    assert (rows[0]["orig_w"], rows[0]["orig_h"]) == (48, 48)
    assert {r["pixels"].shape for r in eval_ds.take_all()} == {(32, 32, 3)}
    assert {"00000001", "00000002", "00000003"}.isdisjoint(r["key"] for r in rows)
    assert [r["key"] for r in rows] == [r["key"] for r in train.take_all()]  # same order every pass


def test_collate_is_deterministic_per_epoch(ray_local, world):
    train, _, _ = _datasets(_cfg(world, eval={"holdout": 0}), image_size=32)
    batch = train.take_batch(8, batch_format="numpy")  # runs to the end: no executor left behind
    mk = lambda epoch, train=True: Collate(model_name="clip-tiny", image_size=32, mean=MEAN, std=STD,  # noqa: E731
                                           policy="both", seed=0, epoch=epoch, train=train)
    a, b, c = mk(0)(batch), mk(0)(batch), mk(1)(batch)
    assert a["image"].shape == (8, 3, 32, 32) and len(a["texts"]) == 2 and a["texts"][0].shape == (8, 32)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["texts"][1], b["texts"][1])
    assert not torch.equal(a["image"], c["image"])           # a new crop each epoch
    square = {**batch, "pixels": np.stack([p[8:40, 8:40] for p in batch["pixels"]])}
    plain = mk(0, train=False)(square)                       # eval: no crop, just normalisation
    expect = (torch.as_tensor(square["pixels"]).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    assert torch.allclose(plain["image"], expect, atol=1e-5) and len(plain["texts"]) == 1


def test_variable_sized_rows_cache_and_shuffle(ray_local, tmp_path):
    """Whole images of different sizes travel as one variable-shaped tensor column: through `data.cache`
    (materialize) and a local shuffle buffer, each row keeping its own shape and original size."""
    import io
    import tarfile

    from PIL import Image

    sizes = [(40 + 8 * i, 64 - 4 * i) for i in range(10)]
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        for i, (w, h) in enumerate(sizes):
            buf = io.BytesIO()
            Image.new("RGB", (w, h), (i * 20, 90, 150)).save(buf, format="JPEG")
            for ext, data in (("jpg", buf.getvalue()), ("txt", f"photo {i}".encode())):
                info = tarfile.TarInfo(f"{i:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    cfg = build_config(PretrainConfig, {"data": {"shards": str(shard), "batch_size": 4, "decode_batch_size": 3,
                                                 "cache": True}, "captions": {"policy": "real"},
                                        "ray": {"in_process": True}})
    train, _, counts = _datasets(cfg, image_size=32)
    assert counts["ok"] == 10
    seen = {}
    for b in train.iter_batches(batch_size=4, batch_format="numpy", local_shuffle_buffer_size=6,
                                local_shuffle_seed=1):
        for k, px, w, h in zip(b["key"], b["pixels"], b["orig_w"], b["orig_h"]):
            seen[str(k)] = (px.shape, (int(w), int(h)))
        out = Collate(model_name="clip-tiny", image_size=32, mean=MEAN, std=STD, policy="real", seed=0, epoch=0)(b)
        assert out["image"].shape == (len(b["key"]), 3, 32, 32)
    assert seen == {f"{i:05d}": ((h, w, 3), (w, h)) for i, (w, h) in enumerate(sizes)}


def test_read_join_and_decode_run_in_one_task_given_two_shards_per_cpu(ray_local, tmp_path):
    """With two shards per cluster CPU the read tasks are not split, so Ray fuses the join and the decode into
    them and the encoded images never cross the object store; with fewer shards Ray splits the read's blocks and
    the maps run apart, on every CPU. The rows and their order are the same either way."""
    import ray

    cpus = int(ray.cluster_resources()["CPU"])
    many = write_world(tmp_path / "many", n_shards=2 * cpus, per_shard=3)
    fused = "ReadTarShards->MapBatches(join_recaptions)->MapBatches(decode_ok)"
    orders = []
    for shards in (many["shards"], [f"{many['shards']}/00000.tar", f"{many['shards']}/00001.tar"]):
        cfg = build_config(PretrainConfig, {"data": {"shards": shards, "recaptions": many["recaptions"],
                                                     "batch_size": 2, "count_errors": False},
                                            "captions": {"policy": "both"}, "ray": {"in_process": True}})
        train, _, _ = _datasets(cfg, image_size=32)
        orders.append([r["key"] for r in train.take_all()])
        assert (fused in train.stats()) == (shards is many["shards"])
    assert orders[0] == [f"{k:05d}{i:04d}" for k in range(2 * cpus) for i in range(3)]
    assert orders[1] == orders[0][:6]
