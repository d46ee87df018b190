"""Recaption with teachers (issue 35): DataCompDR-layout tars beside the Parquet, round-tripped through pretrain's
distillation, with the stored embeddings equal to a fresh teacher forward on pretrain's re-applied views."""
from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from shard_files import good_samples, jpeg_bytes, write_tar

from clipdense.config import ConfigError, build_config
from clipdense.data.datacompdr import read_datacompdr
from clipdense.data.images import decode_rgb
from clipdense.models.registry import create_clip, create_clip_and_transforms, tokenizer_for
from clipdense.pretrain import PretrainConfig
from clipdense.pretrain.dr_views import parse_views, reapply_view
from clipdense.recaption import RecaptionConfig, run
from clipdense.recaption.views import teacher_input

VIEWS, N_SYN, DIM = 2, 2, 64   # clip-tiny's embed_dim


def _inputs(d):
    """Two shards: DataComp-like rows with uid + sha256 in the json, and plain rows without (key fallback), one of
    them undecodable (a coded error row, absent from the tar)."""
    d.mkdir(parents=True, exist_ok=True)
    a = [{"key": f"a{i:04d}", "jpg": jpeg_bytes(i, 40 + 8 * i), "txt": f"caption a{i}",
          "json": {"uid": f"uid{i:02d}", "key": f"a{i:04d}"}} for i in range(4)]
    write_tar(d / "000000.tar", a)
    b = good_samples("b", 3, seed=1) + [{"key": "bad", "jpg": b"not a jpeg", "txt": "broken"}]
    write_tar(d / "000001.tar", b)
    return {"000000": a, "000001": b}


def _members(path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar:
            key, _, ext = m.name.partition(".")
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


@pytest.fixture(scope="module")
def reinforced(ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reinforce")
    torch.manual_seed(0)
    ckpt = tmp / "teacher.pt"
    torch.save(create_clip("clip-tiny").state_dict(), ckpt)
    inputs = _inputs(tmp / "in")
    cfg = build_config(RecaptionConfig, {
        "input": str(tmp / "in"), "output": str(tmp / "out"),
        "engine": {"kind": "echo", "num_captions": N_SYN, "batch_size": 8}, "decode": {"size": 24},
        "teachers": {"models": [{"name": "clip-tiny", "pretrained": str(ckpt)}], "views": VIEWS, "device": "cpu",
                     "batch_size": 8}})
    summary = run(cfg)
    return {"tmp": tmp, "ckpt": ckpt, "inputs": inputs, "summary": summary, "cfg": cfg}


def test_layout_is_datacompdr_one_tar_per_shard_no_row_lost(reinforced):
    out, s = reinforced["tmp"] / "out", reinforced["summary"]
    assert s["shards"]["written"] == 2 and s["rows_in"] == 8 and s["failed_by_code"] == {"undecodable_image": 1}
    assert sorted(p.name for p in out.iterdir()) == ["000000.parquet", "000000.tar", "000001.parquet", "000001.tar",
                                                     "_scores.json", "_scores.png", "_stats.json"]
    scores = json.loads((out / "_scores.json").read_text())
    assert scores["alt_text"]["count"] == 7 and scores["synthetic"]["count"] == 7 * N_SYN  # the bad row: none
    assert s["stats"]["scores"]["synthetic"]["p50"] == scores["synthetic"]["p50"]
    assert (out / "_scores.png").read_bytes()[:4] == b"\x89PNG"
    for stem, samples in reinforced["inputs"].items():
        rows = pq.read_table(out / f"{stem}.parquet").to_pylist()
        assert [r["key"] for r in rows] == [x["key"] for x in samples]
        assert set(rows[0]) >= {"key", "caption", "syn_captions", "error_code", "caption_score", "syn_scores"}
        assert "teacher_npz" not in rows[0]
        assert all((r["caption_score"] is None) == (r["error_code"] is not None) for r in rows)
        assert all(len(r["syn_scores"]) == N_SYN for r in rows if r["error_code"] is None)
        members = _members(out / f"{stem}.tar")
        assert list(members) == [r["key"] for r in rows if r["error_code"] is None]
        for key, m in members.items():
            assert sorted(m) == ["json", "npz", "paug.json", "syn.json", "url.txt"]
            row = [r for r in rows if r["key"] == key][0]
            syn = json.loads(m["syn.json"])
            assert syn["syn_text"] == row["syn_captions"] and len(syn["syn_score"]) == N_SYN
            np.testing.assert_allclose(syn["syn_score"], row["syn_scores"], atol=1e-6)  # Parquet and tar agree
            assert len(parse_views(json.loads(m["paug.json"])["param_aug"])) == VIEWS
            with np.load(io.BytesIO(m["npz"])) as z:
                assert sorted(z.files) == ["image_emb", "text_emb"]
                assert z["image_emb"].dtype == np.float16 and z["image_emb"].shape == (VIEWS, DIM)
                assert z["text_emb"].dtype == np.float16 and z["text_emb"].shape == (1 + N_SYN, DIM)
            meta = json.loads(m["json"])
            assert sorted(meta) == ["sha256", "uid"]
            assert meta["uid"] == (f"uid{int(key[1:]):02d}" if stem == "000000" else key)  # no uid -> the key
    with open(out / "000000.tar", "rb") as f:
        samples, broken = read_datacompdr(f)
    assert broken is None and sorted(samples) == [f"uid{i:02d}" for i in range(4)]
    assert all(len(x.syn_score) == N_SYN for x in samples.values())  # syn.json's syn_score, read back


def test_in_process_recaption_writes_what_the_ray_pipeline_wrote_and_never_imports_ray(reinforced, tmp_path):
    """`ray.in_process: true` (recaption/local.py: decode in 2 DataLoader workers, captioner and teacher here): the
    same Parquet rows and the same DataCompDR tars as the Ray Data pipeline, from `clipdense recaption` in a fresh
    process that never imports Ray."""
    cfg = reinforced["cfg"]
    local = cfg.model_copy(update={"output": str(tmp_path / "out"),
                                   "ray": cfg.ray.model_copy(update={"in_process": True}),
                                   "decode": cfg.decode.model_copy(update={"local_workers": 2})})
    (tmp_path / "recaption.yaml").write_text(local.to_yaml())
    code = ("import sys; from clipdense.cli import main; rc = main(['recaption', '--config', sys.argv[1]]); "
            "print('RAY_IMPORTED' if 'ray' in sys.modules else 'NO_RAY'); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "recaption.yaml")], capture_output=True,
                          text=True, timeout=300, env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "NO_RAY"
    ray_out, scores = reinforced["tmp"] / "out", ("caption_score", "syn_scores")
    for stem in reinforced["inputs"]:  # teacher batches are cut per shard here: floats within rounding
        ours, theirs = (pq.read_table(d / f"{stem}.parquet") for d in (tmp_path / "out", ray_out))
        assert ours.drop_columns(list(scores)).equals(theirs.drop_columns(list(scores)))
        for col in scores:
            a, b = (np.array(t.column(col).to_pylist(), dtype=object) for t in (ours, theirs))
            assert [x is None for x in a] == [x is None for x in b]
            np.testing.assert_allclose(np.array([x for x in a if x is not None], float),
                                       np.array([x for x in b if x is not None], float), atol=1e-6)
        mine, ray_members = _members(tmp_path / "out" / f"{stem}.tar"), _members(ray_out / f"{stem}.tar")
        assert list(mine) == list(ray_members)
        for key, m in mine.items():
            assert {e: v for e, v in m.items() if e not in ("npz", "syn.json")} == \
                {e: v for e, v in ray_members[key].items() if e not in ("npz", "syn.json")}
            with np.load(io.BytesIO(m["npz"])) as z, np.load(io.BytesIO(ray_members[key]["npz"])) as r:
                for name in ("image_emb", "text_emb"):
                    np.testing.assert_allclose(z[name].astype(np.float32), r[name].astype(np.float32), atol=2e-3)


def test_stored_embeddings_equal_a_fresh_teacher_forward(reinforced):
    model, _, preprocess = create_clip_and_transforms("clip-tiny", pretrained=str(reinforced["ckpt"]))
    model.eval()
    tok = tokenizer_for("clip-tiny")
    v = model.visual
    members = _members(reinforced["tmp"] / "out" / "000000.tar")
    for sample in reinforced["inputs"]["000000"]:
        m = members[sample["key"]]
        img = decode_rgb(sample["jpg"])
        views = torch.stack([reapply_view(np.asarray(img), img.size, view)
                             for view in parse_views(json.loads(m["paug.json"])["param_aug"])])
        with torch.no_grad():
            image = model.encode_image(teacher_input(views, 64, v.image_mean, v.image_std), normalize=True)
            text = model.encode_text(tok([sample["txt"]] * (1 + N_SYN)), normalize=True)  # echo: N copies
        with np.load(io.BytesIO(m["npz"])) as z:
            np.testing.assert_allclose(z["image_emb"].astype(np.float32), image.numpy(), atol=2e-3)
            np.testing.assert_allclose(z["text_emb"].astype(np.float32), text.numpy(), atol=2e-3)
        with torch.no_grad():  # the CLIP score: the eval view's embedding against each caption's
            score = (text @ model.encode_image(preprocess(img)[None], normalize=True)[0]).numpy()
        np.testing.assert_allclose(json.loads(m["syn.json"])["syn_score"], score[1:], atol=1e-4)


def test_rerun_skips_done_shards(reinforced):
    again = run(reinforced["cfg"])
    assert again["shards"] == {"total": 2, "skipped_done": 2, "written": 0}


def test_pretrain_distills_from_the_reinforced_output(reinforced):
    from clipdense.pretrain import run as pretrain

    tmp = reinforced["tmp"]
    cfg = build_config(PretrainConfig, {
        "model": {"name": "clip-tiny"}, "captions": {"policy": "both"}, "ray": {"in_process": True},
        "loss": {"distill": {"enabled": True, "teacher_dims": [DIM]}},
        "data": {"shards": str(tmp / "in"), "recaptions": str(tmp / "out"), "batch_size": 6, "decode_cpus": 0.5},
        "train": {"out_dir": str(tmp / "pre"), "schedule": {"total_steps": 2, "warmup_steps": 1},
                  "checkpoint": {"every_steps": 0}, "log_every": 1}})
    pretrain(cfg)
    steps = [json.loads(x) for x in (tmp / "pre" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(steps) == 2 and all(math.isfinite(s["loss"]) for s in steps)
    assert all(s["distill_rows"] > 0 for s in steps)


def test_caption_provenance_names_the_weights_and_each_seed(tmp_path):
    import hashlib

    from clipdense.recaption.config import DecodeConfig, EngineConfig
    from clipdense.recaption.engines.resolve import resolve_engine, weights_id
    from clipdense.recaption.engines.seeds import row_seed

    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"weights")
    assert weights_id(EngineConfig(kind="coca", checkpoint=str(ckpt))) == \
        f"sha256:{hashlib.sha256(b'weights').hexdigest()}"
    assert weights_id(EngineConfig(kind="coca", pretrained="laion2b")) == "revision:laion2b"
    (tmp_path / "vlm").mkdir()
    (tmp_path / "vlm" / "config.json").write_text("{}")
    folder = weights_id(EngineConfig(kind="vllm", model=str(tmp_path / "vlm")))
    (tmp_path / "vlm" / "config.json").write_text('{"a": 1}')
    assert folder.startswith("sha256:") and weights_id(EngineConfig(kind="vllm", model=str(tmp_path / "vlm"))) != folder
    assert weights_id(EngineConfig(kind="vllm", model="org/m", engine_kwargs={"revision": "abc"})) == "revision:abc"
    assert weights_id(EngineConfig(kind="echo")) is None
    engine = resolve_engine(EngineConfig(kind="echo", num_captions=2), DecodeConfig(), remote=False)
    assert engine.caption_seeds("k") is None and engine.provenance["weights"] is None
    vllm = resolve_engine(EngineConfig(kind="vllm", model="org/m", seed=3, num_captions=2), DecodeConfig(), True)
    assert vllm.caption_seeds("k") == [row_seed(3, "k")] * 2


def test_rerank_keeps_the_best_distinct_candidates_by_score():
    from clipdense.recaption.config import TeachersConfig
    from clipdense.recaption.teacher_forward import TeacherForward

    torch.manual_seed(0)
    fwd = TeacherForward(TeachersConfig(models=[{"name": "clip-tiny"}], device="cpu"))
    image = jpeg_bytes(5, 48)
    cands = ["a red square", "a blue circle", "a red square", "two green dots", "a blue circle"]
    drawn = fwd.drawer(10 ** 8)([image, image], ["a", "b"])
    kept = fwd.rerank(drawn.scorer_input(), [cands, ["same", "same", "same"]], 3)
    t = fwd.scorer
    with torch.no_grad():
        img = t.model.encode_image(t.preprocess(decode_rgb(image))[None], normalize=True)[0]
        score = t.model.encode_text(t.tokenizer(cands), normalize=True) @ img
    assert sorted(kept[0]) == [0, 1, 3]  # duplicates dropped
    assert [float(score[j]) for j in kept[0]] == sorted((float(score[j]) for j in (0, 1, 3)), reverse=True)
    assert kept[1] == [0, 0, 0]  # one distinct candidate: repeated to keep 3
    with pytest.raises(ConfigError, match="teachers"):
        build_config(RecaptionConfig, {"input": "x", "output": "y", "engine": {"rerank": {"candidates": 4}}})
    cfg = build_config(RecaptionConfig, {"input": "x", "output": "y", "teachers": {"models": [{"name": "clip-tiny"}]},
                                         "engine": {"rerank": {"candidates": 4, "keep": 2}}})
    assert cfg.engine.samples == 4


def test_actor_pools_that_hold_every_cpu_of_a_local_ray_are_a_one_line_error():
    """Teachers and captioners holding all CPUs of a Ray that cannot grow left the shard reads unscheduled and the
    pipeline waiting forever (the teacher bench did, at concurrency = cores): refused before anything runs."""
    from clipdense.recaption.pipeline import check_cpus_left_to_read

    cfg = build_config(RecaptionConfig, {"input": "x", "output": "y", "engine": {"kind": "echo", "num_cpus": 0},
                                         "teachers": {"models": [{"name": "clip-tiny"}], "concurrency": 2,
                                                      "num_cpus": 1}})
    with pytest.raises(ConfigError, match=r"teachers.concurrency x teachers.num_cpus = 2 of this Ray's 2 CPUs") as e:
        check_cpus_left_to_read(cfg.engine, cfg.teachers, 2.0)
    assert "\n" not in str(e.value) and "ray.num_cpus" in str(e.value)
    check_cpus_left_to_read(cfg.engine, cfg.teachers, 3.0)          # one CPU left to read: fine
    coca = build_config(RecaptionConfig, {"input": "x", "output": "y",
                                          "engine": {"kind": "echo", "concurrency": [2, 4], "num_cpus": 1}})
    with pytest.raises(ConfigError, match="engine.concurrency x engine.num_cpus = 2 of"):
        check_cpus_left_to_read(coca.engine, None, 2.0)             # the pool's minimum counts
    check_cpus_left_to_read(coca.engine, None, 3.0)
