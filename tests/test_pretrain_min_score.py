"""captions.min_score: synthetic captions scoring below it are never drawn (pretrain/captions.py), rows left with
none fall back as the policy says or are counted (pretrain/join.py), rows without scores are a one-line error.

The fixture is an img2dataset shard and its recaption Parquet with known `syn_scores`, joined by the real join."""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from clipdense.config import DataError, build_config
from clipdense.data.layouts import datacompdr_shard, img2dataset_shard
from clipdense.data.shards import SCHEMA, read_shard_local
from clipdense.data.storage import Storage
from clipdense.pretrain import PretrainConfig
from clipdense.pretrain.batches import Collate
from clipdense.pretrain.captions import pick_batch
from clipdense.pretrain.data import build_datasets
from clipdense.pretrain.dr_views import draw_view
from clipdense.pretrain.join import join_recaptions
from clipdense.pretrain.run import row_sources

MIN = 0.3
# row -> (alt text, each synthetic caption's score): row 0 keeps 1 and 2 (0.3 is kept: >=), row 1 none (it has alt
# text), row 2 keeps 0, row 3 none and no alt text
ROWS = [("web 0", [0.1, 0.5, 0.3, 0.29]), ("web 1", [0.2, 0.25]), ("web 2", [0.9, 0.05]), (None, [0.1])]
TEXT_DIM = 4


def _syn(i: int) -> list[str]:
    return [f"syn {j} of {i}" for j in range(len(ROWS[i][1]))]


def _kept(i: int) -> set[str]:
    return {t for t, s in zip(_syn(i), ROWS[i][1]) if s >= MIN}


def _jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40 + 8 * i, 36), (40 * i, 90, 200 - 30 * i)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture
def world(tmp_path) -> dict:
    """An image shard and its recaptions with scores (`rc`) and without (`old`: a recaption of an older version),
    and as DataCompDR shards, joined by key (the images carry no uid), with `syn_score` (`dr`) and without (`drold`)."""
    shard = img2dataset_shard(tmp_path / "dc", 0, [{"jpg": _jpeg(i), "caption": real, "size": (40 + 8 * i, 36)}
                                                   for i, (real, _) in enumerate(ROWS)])
    recaptions = [{"key": k, "caption": ROWS[i][0], "syn_captions": _syn(i), "syn_scores": ROWS[i][1],
                   "error_code": None, "error": None} for i, k in enumerate(shard["keys"])]
    schema = pa.schema([("key", pa.string()), ("caption", pa.string()), ("syn_captions", pa.list_(pa.string())),
                        ("syn_scores", pa.list_(pa.float32())), ("error_code", pa.string()), ("error", pa.string())])
    for name, table in (("rc", pa.Table.from_pylist(recaptions, schema=schema)),
                        ("old", pa.Table.from_pylist(recaptions, schema=schema).drop_columns(["syn_scores"]))):
        (tmp_path / name).mkdir()
        pq.write_table(table, tmp_path / name / "00000.parquet")
    dr = [{"key": k, "uid": k, "sha256": None, "syn_text": _syn(i), "syn_score": ROWS[i][1], "npz": _npz(1 + 4)}
          for i, k in enumerate(shard["keys"])]
    datacompdr_shard(tmp_path / "dr" / "00000.tar", dr)
    datacompdr_shard(tmp_path / "drold" / "00000.tar", [{**d, "syn_score": None} for d in dr])
    return {"tar": shard["tar"], "keys": shard["keys"], **{n: str(tmp_path / n) for n in ("rc", "old", "dr", "drold")}}


def _join(world: dict, policy: str, min_score: float | None = MIN, recaptions: str = "rc") -> list[dict]:
    rows = pa.Table.from_pylist(read_shard_local(Storage(str(world["tar"]))), schema=SCHEMA)
    return join_recaptions(rows, Storage(world[recaptions]), policy, min_score).to_pylist()


def _drawn(joined: list[dict], policy: str, min_score: float | None = MIN, mix_p: float = 0.5) -> list[set[str]]:
    """Every text each usable row's synthetic (or only) slot drew over 40 epochs."""
    ok = [r for r in joined if r["error_code"] is None]
    drawn = [set() for _ in ok]
    for epoch in range(40):
        slots = pick_batch(policy, [r["key"] for r in ok], [r["caption"] for r in ok],
                           [r["syn_captions"] for r in ok], 0, epoch, mix_p, [r["syn_scores"] for r in ok], min_score)
        for seen, text in zip(drawn, slots[-1]):
            seen.add(text)
    return drawn


@pytest.mark.parametrize("recaptions", ["rc", "dr"])
def test_picked_captions_are_exactly_those_at_or_above_min_score(world, recaptions):
    joined = _join(world, "synthetic", recaptions=recaptions)
    assert [r["error_code"] for r in joined] == [None, "below_min_score", None, "below_min_score"]  # counted rows
    assert joined[0]["syn_scores"] == pytest.approx(ROWS[0][1]) and joined[0]["syn_captions"] == _syn(0)  # whole
    assert _drawn(joined, "synthetic") == [_kept(0), _kept(2)] == [{"syn 1 of 0", "syn 2 of 0"}, {"syn 0 of 2"}]
    unfiltered = _join(world, "synthetic", None, recaptions)
    assert all(r["error_code"] is None for r in unfiltered)
    assert _drawn(unfiltered, "synthetic", None) == [set(_syn(i)) for i in range(len(ROWS))]  # the filter narrows


def test_mix_falls_back_to_the_real_caption_and_both_skips(world):
    mixed = _join(world, "mix")
    assert [r["error_code"] for r in mixed] == [None, None, None, "below_min_score"]  # row 3 has no alt text either
    assert _drawn(mixed, "mix", mix_p=1.0) == [_kept(0), {"web 1"}, _kept(2)]
    both = _join(world, "both")
    assert [r["error_code"] for r in both] == [None, "below_min_score", None, "below_min_score"]
    assert [r["error_code"] for r in _join(world, "real")] == [None, None, None, "no_caption"]  # no effect


@pytest.mark.parametrize("old, file", [("old", "00000.parquet"), ("drold", "00000.tar")])
def test_missing_scores_with_min_score_is_a_one_line_error_naming_the_file(world, old, file):
    with pytest.raises(DataError) as e:
        _join(world, "synthetic", recaptions=old)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{world[old]}/{file}: key {world['keys'][0]}")
    assert "captions.min_score" in msg and "syn_scores" in msg
    assert all(r["error_code"] is None for r in _join(world, "synthetic", None, old))  # unset: older files train


def _npz(n_texts: int) -> bytes:
    """Teacher embeddings whose text row t is all t: which stored caption a row picked reads off the value."""
    buf = io.BytesIO()
    np.savez(buf, image_emb=np.ones((2, TEXT_DIM), np.float16),
             text_emb=np.repeat(np.arange(n_texts, dtype=np.float16)[:, None], TEXT_DIM, 1))
    return buf.getvalue()


def test_distillation_keeps_each_kept_caption_paired_with_its_stored_embedding(world):
    """The collate draws among the kept captions but looks each up in the whole stored list: row 2's only kept
    caption is `syn 0`, its embedding text_emb row 1 (a list filtered before the lookup would shift others)."""
    ok = [r for r in _join(world, "synthetic") if r["error_code"] is None]
    ims = [np.asarray(Image.open(io.BytesIO(r["image_bytes"])).convert("RGB")) for r in ok]
    views = json.dumps([draw_view(Image.fromarray(im))[0] for im in ims[:1]] * 2)
    batch = {"key": np.array([r["key"] for r in ok], object), "caption": [r["caption"] for r in ok],
             "syn_captions": [np.array(r["syn_captions"], object) for r in ok],
             "syn_scores": [np.array(r["syn_scores"], np.float32) for r in ok], "pixels": ims,
             "orig_w": [im.shape[1] for im in ims], "orig_h": [im.shape[0] for im in ims],
             "aug_params": [views] * len(ok), "teacher_emb": [_npz(1 + max(len(s) for _, s in ROWS))] * len(ok)}
    for epoch in range(6):
        collate = Collate(model_name="clip-tiny", image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, policy="synthetic",
                          seed=0, epoch=epoch, min_score=MIN, distill_slots=((0, "synthetic"),))
        out = collate(batch)
        picked = pick_batch("synthetic", [r["key"] for r in ok], [r["caption"] for r in ok],
                            [r["syn_captions"] for r in ok], 0, epoch, scores=[r["syn_scores"] for r in ok],
                            min_score=MIN)[0]
        for i, r in enumerate(ok):
            j = r["syn_captions"].index(picked[i])
            assert r["syn_scores"][j] >= MIN and bool(out["distill_mask"][i, 0])
            assert torch.all(out["distill_text_emb"][i, 0] == 1 + j), (i, picked[i])
        assert float(out["distill_text_emb"][1, 0, 0]) == 1.0  # row 2 of the shard: syn 0 (score 0.9) only


def test_counts_record_min_score_and_the_errors_come_back_as_one_line(ray_local, world, tmp_path):
    base = {"data": {"shards": str(world["tar"]), "recaptions": world["rc"], "batch_size": 2},
            "captions": {"policy": "mix", "min_score": MIN}, "train": {"out_dir": str(tmp_path / "run")}}
    cfg = build_config(PretrainConfig, base)
    _, _, counts = build_datasets(*row_sources(cfg.data, cfg.eval, "mix", MIN), cfg.data, cfg.eval, 32)
    assert counts["rows"] == 4 and counts["ok"] == 3 and counts["errors"] == {"below_min_score": 1}
    assert {k: counts["synthetic"][k] for k in ("min_score", "captions_kept", "captions_below_min_score",
                                                 "rows_real_only")} == {"min_score": MIN, "captions_kept": 3,
                                                                        "captions_below_min_score": 5,
                                                                        "rows_real_only": 1}
    old = build_config(PretrainConfig, {**base, "data": {**base["data"], "recaptions": world["old"]}})
    with pytest.raises(DataError) as e:
        build_datasets(*row_sources(old.data, old.eval, "mix", MIN), old.data, old.eval, 32)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"{world['old']}/00000.parquet: key ")
