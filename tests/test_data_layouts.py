"""Real dataset layouts users bring: an img2dataset output folder, images without alt text under each caption
policy, DataCompDR shards joined to DataComp image shards. Files are written in the exact formats
(clipdense/data/synth/layouts.py); reads, recaption and pretrain are the real ones."""
from __future__ import annotations

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pretrain_files import COLOURS, SHAPES, shape_jpeg

from clipdense.config import build_config
from clipdense.data.layouts import img2dataset_shard
from clipdense.data.paths import expand_shards
from clipdense.data.shards import read_shard_local
from clipdense.data.storage import Storage
from clipdense.pretrain.captions import missing_for, pick_batch, pick_captions, real_mask, sample_rng
from clipdense.pretrain.losses import masked_clip_loss, masked_siglip_loss

SYN = ["a red circle", "circle that is red"]


def _img2dataset_folder(root, n_shards=2, per_shard=12, seed=0) -> dict:
    """Shards with failed downloads (two statuses) and images whose alt text is empty or missing."""
    import numpy as np

    rng = np.random.default_rng(seed)
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    out = {"keys": [], "failed": {}, "no_alt": [], "shards": []}
    for k in range(n_shards):
        samples = []
        for i in range(per_shard):
            colour, shape = combos[int(rng.integers(len(combos)))]
            jpg = shape_jpeg(colour, shape, rng)
            caption = f"{colour} {shape}" if i % 4 else ("" if i % 8 == 0 else None)
            samples.append({"jpg": jpg, "caption": caption, "size": (48, 48), "syn": [f"a {colour} {shape}"]})
        samples[3] = {"jpg": None, "caption": "gone", "status": "failed_to_download",
                      "error_message": "HTTP Error 404: Not Found"}
        if k == 1:
            samples[5] = {"jpg": None, "caption": "too odd", "status": "failed_to_resize",
                          "error_message": "image too small"}
        info = img2dataset_shard(root, k, [{x: v for x, v in s.items() if x != "syn"} for s in samples])
        out["shards"].append(info)
        out["keys"] += info["keys"]
        for st, n in info["failed"].items():
            out["failed"][st] = out["failed"].get(st, 0) + n
        out["no_alt"] += [key for key, s in zip(info["keys"], samples) if s["jpg"] is not None and not s["caption"]]
        out.setdefault("syn", {}).update({key: s.get("syn") for key, s in zip(info["keys"], samples)})
    return out


def test_img2dataset_folder_reads_as_tars_with_metadata(tmp_path):
    world = _img2dataset_folder(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "00000.parquet", "00000.tar", "00000_stats.json", "00001.parquet", "00001.tar", "00001_stats.json"]
    listed = expand_shards(Storage(str(tmp_path)))
    shards, sidecars = listed.files, listed.sidecars
    assert [s.rsplit("/", 1)[1] for s in shards] == ["00000.tar", "00001.tar"]  # the parquet is no second shard
    assert {t.rsplit("/", 1)[1]: p.rsplit("/", 1)[1] for t, p in sidecars.items()} == {
        "00000.tar": "00000.parquet", "00001.tar": "00001.parquet"}
    assert expand_shards(Storage(str(tmp_path / "*.tar"))).sidecars == sidecars  # found beside the tar when not named
    rows = [r for s in shards for r in read_shard_local(Storage(s))]
    assert sorted(r["key"] for r in rows) == sorted(world["keys"])  # every URL accounted for, once
    by_key = {r["key"]: r for r in rows}
    failed = [r for r in rows if r["error_code"]]
    assert {r["error_code"] for r in failed} == {"failed_to_download", "failed_to_resize"}
    assert by_key["000000003"]["error"] == "HTTP Error 404: Not Found"
    assert json.loads(by_key["000000003"]["meta"])["status"] == "failed_to_download"
    assert all(by_key[k]["error_code"] is None and by_key[k]["caption"] is None for k in world["no_alt"])
    meta = json.loads(by_key["000000001"]["meta"])
    assert meta["sha256"] and meta["original_width"] == 48 and by_key["000000001"]["caption"]


def test_a_listed_parquet_that_holds_images_stays_a_shard(tmp_path):
    img2dataset_shard(tmp_path, 0, [{"jpg": shape_jpeg("red", "circle", __import__("numpy").random.default_rng(0)),
                                     "caption": "x"}])
    pq.write_table(pa.table({"key": ["p0"], "image_bytes": [b"x"], "status": ["success"]}), tmp_path / "00001.parquet")
    listed = expand_shards(Storage(str(tmp_path)))
    shards, sidecars = listed.files, listed.sidecars
    assert [s.rsplit("/", 1)[1] for s in shards] == ["00000.tar", "00001.parquet"] and len(sidecars) == 1


def test_output_into_the_img2dataset_folder_is_refused_in_one_line(tmp_path, capsys):
    """img2dataset's own NNNNN.parquet (per-URL metadata) is neither a finished output nor overwritten."""
    import shutil

    from clipdense.cli import main as cli_main
    from clipdense.config import DataError
    from clipdense.recaption.plan import plan_shards
    from clipdense.recaption.writer import OUTPUT_SCHEMA

    i2d = tmp_path / "i2d"
    _img2dataset_folder(i2d)
    listed = expand_shards(Storage(str(i2d)))
    shards = list(zip(listed.names, listed.files))
    for out in (str(i2d), str(i2d) + "/"):
        with pytest.raises(DataError, match=f"output '{i2d}/?' is the folder of the input shards"):
            plan_shards(shards, output=Storage(out))
    before = {p.name: p.read_bytes() for p in i2d.iterdir()}
    rc = cli_main(["recaption", f"input={i2d}", f"output={i2d}", "engine.kind=echo"])  # fails before Ray starts
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("clipdense recaption: error: output") and str(i2d) in err[0]
    assert {p.name: p.read_bytes() for p in i2d.iterdir()} == before  # nothing written over
    # a copy of the folder (or of its metadata alone) as the output of another input: not taken as done
    shutil.copytree(i2d, tmp_path / "copy")
    (tmp_path / "meta").mkdir()
    shutil.copy(i2d / "00001.parquet", tmp_path / "meta" / "00000.parquet")
    for out, name in ((tmp_path / "copy", "00000.parquet"), (tmp_path / "meta", "00000.parquet")):
        with pytest.raises(DataError, match=f"holds {name} that is not a recaption output"):
            plan_shards(shards, output=Storage(str(out)))
    # our own output file is still a finished shard
    (tmp_path / "recap").mkdir()
    pq.write_table(OUTPUT_SCHEMA.empty_table(), tmp_path / "recap" / "00000.parquet")
    plan = plan_shards(shards, output=Storage(str(tmp_path / "recap")))
    assert plan.done == ["00000"] and list(plan.todo) == ["00001"]


@pytest.mark.slow
def test_img2dataset_folder_recaptions_and_pretrains(ray_local, tmp_path):
    from clipdense.pretrain import PretrainConfig
    from clipdense.pretrain import run as pretrain
    from clipdense.recaption import RecaptionConfig
    from clipdense.recaption import run as recaption

    world = _img2dataset_folder(tmp_path / "i2d")
    summary = recaption(build_config(RecaptionConfig, {
        "input": str(tmp_path / "i2d"), "output": str(tmp_path / "recap"), "decode": {"size": 32},
        "engine": {"kind": "echo", "num_captions": 2, "batch_size": 8}}))
    assert summary["shards"]["total"] == 2 and summary["rows_in"] == len(world["keys"])
    assert summary["failed_by_code"] == world["failed"]  # failed downloads counted by img2dataset's status
    assert summary["rows_captioned"] == len(world["keys"]) - sum(world["failed"].values())
    out = {r["key"]: r for f in ("00000", "00001")
           for r in pq.read_table(tmp_path / "recap" / f"{f}.parquet").to_pylist()}
    assert sorted(out) == sorted(world["keys"])
    assert all(out[k]["error_code"] is None and len(out[k]["syn_captions"]) == 2 for k in world["no_alt"])
    # pretrain on the same folder as given, with synthetic captions in our own recaption layout
    for info in world["shards"]:
        rows = [{"key": k, "caption": None, "syn_captions": world["syn"][k], "error_code": None, "error": None}
                for k in info["keys"]]
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "recap" / info["parquet"].rsplit("/", 1)[1])
    result = pretrain(build_config(PretrainConfig, {
        "model": {"name": "clip-tiny"}, "captions": {"policy": "both"}, "ray": {"in_process": True},
        "data": {"shards": str(tmp_path / "i2d"), "recaptions": str(tmp_path / "recap"), "batch_size": 8,
                 "decode_cpus": 0.5},
        "train": {"out_dir": str(tmp_path / "pre"), "schedule": {"total_steps": 2, "warmup_steps": 1},
                  "checkpoint": {"every_steps": 0}, "log_every": 1}}))
    assert result["data"]["errors"] == world["failed"]
    assert result["data"]["rows"] == len(world["keys"])
    assert result["data"]["ok"] == len(world["keys"]) - sum(world["failed"].values())  # no-alt rows train too
    assert all(math.isfinite(v) for v in (result["metrics"]["loss_real"], result["metrics"]["loss_syn"]))


def test_policies_for_rows_without_alt_text():
    rng = lambda: sample_rng(0, 0, "k")  # noqa: E731
    for missing in (None, "", "  "):
        assert missing_for("real", missing, SYN) == "no_caption"
        assert missing_for("mix", missing, SYN) is None and missing_for("both", missing, SYN) is None
        assert missing_for("synthetic", missing, SYN) is None
        assert pick_captions("mix", missing, SYN, rng(), mix_p=0.0)[0] in SYN  # no real one to fall back to
        real, syn = pick_captions("both", missing, SYN, rng())
        assert real == "" and syn in SYN
    assert missing_for("both", None, None) == "no_synthetic_captions"
    assert real_mask(["web", None, "", "x"]) == [True, False, False, True]
    slots = pick_batch("both", ["a", "b"], ["web", None], [SYN, SYN], seed=0, epoch=0)
    assert slots[0] == ["web", ""] and all(s in SYN for s in slots[1])


def test_collate_marks_rows_without_alt_text():
    import numpy as np

    from clipdense.pretrain.batches import Collate

    batch = {"key": np.array(["a", "b", "c"], dtype=object), "caption": np.array(["web", None, ""], dtype=object),
             "syn_captions": np.array([SYN, SYN, SYN] + [None], dtype=object)[:-1],
             "pixels": np.zeros((3, 32, 32, 3), np.uint8)}
    kw = dict(model_name="clip-tiny", image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, seed=0, epoch=0)
    out = Collate(policy="both", **kw)(batch)
    assert out["real_mask"].tolist() == [True, False, False] and len(out["texts"]) == 2
    assert "real_mask" not in Collate(policy="mix", **kw)(batch)


def _features(n=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = lambda: torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)  # noqa: E731
    return f(), f()


def test_masked_losses_equal_open_clip_when_nothing_is_masked():
    from open_clip.loss import ClipLoss, SigLipLoss

    img, txt = _features()
    keep = torch.ones(6, dtype=torch.bool)
    scale, bias = torch.tensor(10.0), torch.tensor(-5.0)
    assert torch.allclose(masked_clip_loss(img, txt, scale, keep), ClipLoss()(img, txt, scale), atol=1e-5)
    assert torch.allclose(masked_siglip_loss(img, txt, scale, bias, keep), SigLipLoss()(img, txt, scale, bias),
                          atol=1e-5)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_masked_rows_leave_the_real_term(kind):
    img, txt = _features()
    mask = torch.tensor([True, False, True, True, False, True])
    scale, bias = torch.tensor(10.0), torch.tensor(-5.0)
    txt = txt.clone().requires_grad_(True)
    fn = (lambda t: masked_clip_loss(img, t, scale, mask)) if kind == "clip" else \
        (lambda t: masked_siglip_loss(img, t, scale, bias, mask))
    loss = fn(txt)
    loss.backward()
    assert math.isfinite(loss.item()) and loss.item() > 0
    assert torch.all(txt.grad[~mask] == 0) and torch.any(txt.grad[mask] != 0)  # placeholders have no say
    other = txt.detach().clone()
    other[~mask] = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    assert torch.allclose(fn(other), loss.detach())
    none = torch.zeros(6, dtype=torch.bool)
    assert float(masked_clip_loss(img, txt, scale, none)) == 0.0


# --- DataCompDR: synthetic captions, augmentation parameters and teacher embeddings joined by uid -----------------

AUGS, DIM, N_SYN = 3, 8, 5


def _datacomp_pair(root, per_shard=10, seed=0) -> dict:
    """DataComp image shards (img2dataset, uid in json) + DataCompDR shards of the same names. Shard 0: one uid
    DataCompDR lacks, one sha256 that differs; one failed download."""
    import hashlib

    import numpy as np

    from clipdense.data.layouts import datacompdr_shard

    rng = np.random.default_rng(seed)
    (root / "dr").mkdir(parents=True)
    out = {"images": str(root / "dc"), "recaptions": str(root / "dr"), "teacher": {}, "expect": {}}
    for k in range(2):
        samples, dr = [], []
        for i in range(per_shard):
            colour, shape = list(COLOURS)[i % 4], SHAPES[i % 2]
            jpg = shape_jpeg(colour, shape, rng)
            uid = hashlib.md5(f"{k}-{i}".encode()).hexdigest()
            samples.append({"jpg": jpg, "caption": f"{colour} {shape}" if i % 3 else "", "size": (48, 48),
                            "uid": uid})
            img, txt = rng.normal(size=(AUGS, DIM)), rng.normal(size=(1 + N_SYN, DIM))
            dr.append({"key": f"{k:05d}{i:04d}", "uid": uid, "sha256": hashlib.sha256(jpg).hexdigest(),
                       "url": f"https://example.com/{uid}.jpg", "syn_text": [f"syn {j} {colour} {shape}" for j in
                                                                             range(N_SYN)],
                       "param_aug": {"0": {"crop": [0, 0, 48, 48], "flip": i % 2}}, "image_emb": img,
                       "text_emb": txt})
            out["teacher"][uid] = (img.astype(np.float16), txt.astype(np.float16))
        if k == 0:
            samples[2] = {"jpg": None, "caption": "lost", "uid": "f" * 32, "status": "failed_to_download",
                          "error_message": "timeout"}
            dr.pop(4)                              # the join misses this uid
            dr[6]["sha256"] = "0" * 64             # (index 6 after the pop: sample 7) another image than DataComp's
        img2dataset_shard(root / "dc", k, samples)
        datacompdr_shard(root / "dr" / f"{k:05d}.tar", dr)
    out["rows"] = 2 * per_shard
    return out


def test_syn_json_as_datacompdr_dict_is_its_captions(tmp_path):
    from clipdense.data.datacompdr import syn_captions_from_json

    assert syn_captions_from_json(json.dumps({"syn_text": ["a", "b"]}).encode()) == ["a", "b"]
    assert syn_captions_from_json(json.dumps(["a"]).encode()) == ["a"]
    assert syn_captions_from_json(b'{"other": 1}') is None and syn_captions_from_json(b"not json") is None


def test_datacompdr_joins_by_uid_with_sha256_check(tmp_path):
    import numpy as np

    from clipdense.data.datacompdr import teacher_batch
    from clipdense.data.shards import SCHEMA
    from clipdense.pretrain.data import join_recaptions

    pair = _datacomp_pair(tmp_path)
    rows = read_shard_local(Storage(f"{pair['images']}/00000.tar"))
    out = join_recaptions(pa.Table.from_pylist(rows, schema=SCHEMA), Storage(pair["recaptions"]), "both").to_pylist()
    codes = {r["key"]: r["error_code"] for r in out}
    assert codes["000000002"] == "failed_to_download"
    assert codes["000000004"] == "no_recaption_for_uid" and codes["000000007"] == "sha256_mismatch"
    ok = [r for r in out if r["error_code"] is None]
    assert len(ok) == 7 and all(len(r["syn_captions"]) == N_SYN for r in ok)
    assert sum(not r["caption"] for r in ok) >= 2  # empty alt text: `both` keeps the row (real term masked)
    r = ok[0]
    uid = json.loads(r["meta"])["uid"]
    assert json.loads(r["aug_params"]) == {"0": {"crop": [0, 0, 48, 48], "flip": 0}}
    t = teacher_batch([r["teacher_emb"], None], [r["key"], "x"])
    assert t["teacher_image_emb"].shape == (2, AUGS, DIM) and t["teacher_text_emb"].shape == (2, 1 + N_SYN, DIM)
    assert np.allclose(t["teacher_image_emb"][0].numpy(), pair["teacher"][uid][0].astype(np.float32))
    assert t["teacher_mask"].tolist() == [True, False] and not t["teacher_image_emb"][1].any()
    real = join_recaptions(pa.Table.from_pylist(rows, schema=SCHEMA), Storage(pair["recaptions"]), "real").to_pylist()
    assert sum(r["error_code"] == "no_caption" for r in real) >= 2


@pytest.mark.slow
def test_datacompdr_reaches_the_batch_and_the_summary(ray_local, tmp_path):
    from clipdense.pretrain import PretrainConfig
    from clipdense.pretrain import run as pretrain
    from clipdense.pretrain.batches import Collate
    from clipdense.pretrain.data import build_datasets
    from clipdense.pretrain.run import row_sources

    pair = _datacomp_pair(tmp_path)
    cfg = build_config(PretrainConfig, {
        "model": {"name": "clip-tiny"}, "captions": {"policy": "both"}, "ray": {"in_process": True},
        "data": {"shards": pair["images"], "recaptions": pair["recaptions"], "batch_size": 6, "decode_cpus": 0.5},
        "train": {"out_dir": str(tmp_path / "pre"), "schedule": {"total_steps": 2, "warmup_steps": 1},
                  "checkpoint": {"every_steps": 0}, "log_every": 1}})
    train, _, counts = build_datasets(*row_sources(cfg.data, cfg.eval, cfg.captions.policy), cfg.data, cfg.eval, 32)
    batch = train.take_batch(6, batch_format="numpy")  # runs to the end: no executor left behind
    b = Collate(model_name="clip-tiny", image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, policy="both", seed=0,
                epoch=0)(batch)
    assert b["teacher_image_emb"].shape == (6, AUGS, DIM) and b["teacher_mask"].all()
    assert len(b["aug_params"]) == 6 and all(json.loads(a) for a in b["aug_params"])
    pretrain(cfg)
    summary = json.loads((tmp_path / "pre" / "pretrain_summary.json").read_text())["data"]
    assert summary["errors"] == {"failed_to_download": 1, "no_recaption_for_uid": 1, "sha256_mismatch": 1}
    assert summary["ok"] == pair["rows"] - 3
    assert summary["synthetic"] == {"rows_with": pair["rows"] - 3, "per_row_mean": float(N_SYN), "join_missed": 1,
                                    "rows_with_teacher_emb": pair["rows"] - 3}


@pytest.mark.parametrize("policy", ["real", "synthetic", "mix", "both"])
def test_each_policy_counts_rows_without_alt_text(ray_local, tmp_path, policy):
    from clipdense.pretrain import PretrainConfig
    from clipdense.pretrain.batches import Collate
    from clipdense.pretrain.data import build_datasets
    from clipdense.pretrain.run import row_sources

    world = _img2dataset_folder(tmp_path / "i2d", n_shards=1)
    (tmp_path / "recap").mkdir()
    info = world["shards"][0]
    pq.write_table(pa.Table.from_pylist([{"key": k, "caption": None, "syn_captions": world["syn"][k],
                                          "error_code": None, "error": None} for k in info["keys"]]),
                   tmp_path / "recap" / "00000.parquet")
    cfg = build_config(PretrainConfig, {
        "captions": {"policy": policy}, "ray": {"in_process": True},
        "data": {"shards": str(tmp_path / "i2d"), "recaptions": str(tmp_path / "recap"), "batch_size": 4}})
    train, _, counts = build_datasets(*row_sources(cfg.data, cfg.eval, cfg.captions.policy), cfg.data, cfg.eval, 32)
    downloaded = len(world["keys"]) - sum(world["failed"].values())
    no_alt = len(world["no_alt"])
    assert counts["errors"] == ({**world["failed"], "no_caption": no_alt} if policy == "real" else world["failed"])
    assert counts["ok"] == downloaded - (no_alt if policy == "real" else 0)
    rows = train.take_all()
    kept = {r["key"] for r in rows}
    assert kept.isdisjoint(world["no_alt"]) if policy == "real" else kept >= set(world["no_alt"])
    batch = {c: __import__("numpy").array([r[c] for r in rows] + [None], dtype=object)[:-1]
             for c in ("key", "caption", "syn_captions")}
    batch["pixels"] = __import__("numpy").stack([r["pixels"] for r in rows])
    out = Collate(model_name="clip-tiny", image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, policy=policy, seed=0,
                  epoch=0)(batch)
    assert out["texts"][0].shape[0] == len(rows)
    if policy == "both":  # the rows without alt text train their synthetic term only
        assert out["real_mask"].tolist() == [k not in world["no_alt"] for k in batch["key"]]
