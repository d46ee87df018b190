"""The recaption stage end to end on a real local Ray cluster: coca-tiny, corrupt inputs, kill + rerun, S3."""
import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from shard_files import good_samples, jpeg_bytes, write_tar

from clipdense.cli import main as cli_main
from clipdense.config import build_config
from clipdense.data.paths import expand_shards
from clipdense.data.shards import read_shard_local
from clipdense.data.storage import Storage
from clipdense.recaption import RecaptionConfig, run
from clipdense.recaption.writer import InjectedFault


def _big_png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (1500, 1000)).save(buf, format="PNG")  # 1.5 MP in a few KB
    return buf.getvalue()


def _shards(d, parquet=False):
    """Three tar shards (one with corrupt samples, one truncated) [+ a Parquet shard]; {file: keys in order}."""
    d.mkdir(parents=True, exist_ok=True)
    good = jpeg_bytes(99)
    write_tar(d / "000000.tar", good_samples("a", 4) + [
        {"key": "trunc", "jpg": good[: len(good) // 2], "txt": "cut short"},
        {"key": "nocap", "jpg": good},
        {"key": "pdf", "pdf": b"%PDF-1.4", "txt": "a document"},
        {"key": "huge", "png": _big_png(), "txt": "a huge image"},
    ])
    write_tar(d / "000001.tar", good_samples("b", 3, seed=1))
    write_tar(d / "000002.tar", good_samples("c", 6, seed=2))
    data = (d / "000002.tar").read_bytes()
    (d / "000002.tar").write_bytes(data[: len(data) // 2])  # a truncated tar
    keys = {p: [r["key"] for r in read_shard_local(Storage(str(d / p)))] for p in sorted(os.listdir(d))}
    if parquet:
        rows = [{"key": f"p{i}", "image_bytes": jpeg_bytes(500 + i) if i != 2 else None, "caption": f"caption p{i}"}
                for i in range(7)]
        pq.write_table(pa.Table.from_pylist(rows), d / "000003.parquet", row_group_size=3)
        keys["000003.parquet"] = [r["key"] for r in rows]
    return keys


def _outputs(out_dir):
    return {f: pq.read_table(os.path.join(out_dir, f)).to_pylist()
            for f in sorted(os.listdir(out_dir)) if f.endswith(".parquet")}


def test_coca_tiny_end_to_end_nothing_lost(ray_local, tmp_path):
    expected = _shards(tmp_path / "in")
    cfg = build_config(RecaptionConfig, {
        "input": str(tmp_path / "in" / "{000000..000002}.tar"), "output": str(tmp_path / "out"),
        "engine": {"kind": "coca", "model": "coca-tiny", "batch_size": 4, "seq_len": 10, "num_captions": 5},
        "decode": {"max_image_pixels": 1_000_000, "batch_size": 8},
        "stats": {"clip_model": "clip-tiny", "clip_sample": 4}})
    summary = run(cfg)
    outputs = _outputs(tmp_path / "out")
    assert sorted(outputs) == ["000000.parquet", "000001.parquet", "000002.parquet"]
    for tar, keys in expected.items():  # one output per input shard, every input row exactly once, in order
        assert [r["key"] for r in outputs[tar.replace(".tar", ".parquet")]] == keys
    rows = {r["key"]: r for rows in outputs.values() for r in rows}
    ok = [r for r in rows.values() if r["error_code"] is None]
    assert all(r["error"] is None for r in ok)
    assert {r["key"] for r in ok} >= {"a0000", "a0003", "b0000", "b0002"}
    assert all(len(r["syn_captions"]) == 5 and all("." not in c for c in r["syn_captions"]) for r in ok)
    assert rows["a0000"]["engine"] == "coca" and rows["a0000"]["model"] == "coca-tiny"
    assert json.loads(rows["a0000"]["sampling"])["top_p"] == 0.9 and rows["a0000"]["prompt"] is None
    assert "image_bytes" not in rows["a0000"]
    assert rows["trunc"]["error_code"] == "undecodable_image" and rows["trunc"]["syn_captions"] is None
    assert rows["nocap"]["error_code"] is None and len(rows["nocap"]["syn_captions"]) == 5  # no alt text: recaptioned
    assert rows["pdf"]["error_code"] == "no_image"
    assert (rows["huge"]["error_code"], rows["huge"]["error"]) == ("image_too_large",
                                                                  "1500x1000 > max_image_pixels=1000000")
    assert sum(r["error_code"] == "truncated_tar" for r in rows.values()) == 1
    assert summary["rows_in"] == len(rows) == sum(len(k) for k in expected.values())
    assert summary["rows_captioned"] == len(ok) and summary["rows_failed"] == len(rows) - len(ok)
    assert summary["failed_by_code"] == {"image_too_large": 1, "no_image": 1, "truncated_tar": 1,
                                         "undecodable_image": 1}
    stats = json.loads((tmp_path / "out" / "_stats.json").read_text())
    assert stats["rows_captioned"] == len(ok) and stats["synthetic"]["count"] == 5 * len(ok)
    assert stats["rows_failed_by_code"] == summary["failed_by_code"]
    assert 0 < stats["synthetic"]["distinct_1"] <= 1 and stats["clip"]["images"] == 4
    assert stats["clip"]["clip_score_synthetic"] >= 0


@pytest.mark.parametrize("in_process", [False, True], ids=["ray", "in_process"])
def test_kill_and_rerun_is_exactly_once(ray_local, tmp_path, in_process):
    """Through Ray Data, and in this process without Ray (recaption/local.py, two decode workers)."""
    expected = _shards(tmp_path / "in", parquet=True)  # tar and Parquet shards mixed
    base = {"input": str(tmp_path / "in"), "output": str(tmp_path / "out"),
            "engine": {"kind": "echo", "num_captions": 2, "batch_size": 4, "retries": 1},
            "decode": {"size": 32, "batch_size": 4, **({"local_workers": 2} if in_process else {})},
            "ray": {"in_process": in_process},
            # every actor's first call fails once (retried); batches holding "caption b1" always fail
            "fault": {"engine_fail_first": 1, "engine_fail_marker": "caption b1", "fail_after_shards": 1}}
    with pytest.raises(InjectedFault):
        run(build_config(RecaptionConfig, base))
    first = _outputs(tmp_path / "out")
    assert list(first) == ["000000.parquet"]  # killed after the first shard: only complete files exist
    assert not [f for f in os.listdir(tmp_path / "out") if f.startswith(".tmp")]
    mtime = os.stat(tmp_path / "out" / "000000.parquet").st_mtime_ns
    base["fault"]["fail_after_shards"] = None
    summary = run(build_config(RecaptionConfig, base))
    assert summary["shards"] == {"total": 4, "skipped_done": 1, "written": 3}
    assert os.stat(tmp_path / "out" / "000000.parquet").st_mtime_ns == mtime  # done shard not rewritten
    outputs = _outputs(tmp_path / "out")
    for name, keys in expected.items():  # exactly once, each in its own shard's file
        assert [r["key"] for r in outputs[name.rsplit(".", 1)[0] + ".parquet"]] == keys
    rows = {r["key"]: r for rows in outputs.values() for r in rows}
    assert rows["a0001"]["syn_captions"] == ["caption a1"] * 2  # echo after a retried failure
    assert rows["b0001"]["error_code"] == "caption_engine_failed"
    assert rows["b0001"]["error"].startswith("RuntimeError: injected engine failure")
    assert summary["failed_by_code"]["caption_engine_failed"] >= 1
    # only the one batch holding the marker fails (which rows share it depends on how blocks span shards)
    failed = [k for k, r in rows.items() if r["error_code"] == "caption_engine_failed"]
    assert "b0001" in failed and len(failed) <= 4
    assert all(r["syn_captions"] == [r["caption"] or ""] * 2 for r in rows.values() if r["error_code"] is None)
    assert rows["p6"]["syn_captions"] == ["caption p6"] * 2 and rows["p2"]["error_code"] == "no_image"
    # a third run has nothing left to do
    assert run(build_config(RecaptionConfig, base))["shards"]["written"] == 0


def test_rerun_over_old_format_outputs_resumes(ray_local, tmp_path):
    """An output directory written by the previous version (one `error` string per row, no `error_code`) resumes:
    its files count as done and are read by code, by the stats and by pretraining's join."""
    from clipdense.data.shards import SCHEMA
    from clipdense.pretrain.data import join_recaptions
    from clipdense.recaption.writer import OUTPUT_SCHEMA

    expected = _shards(tmp_path / "in")
    src = str(tmp_path / "in" / "000000.tar")
    old_errors = {"a0001": f"caption engine failed (RuntimeError: engine died) [{src}]",
                  "trunc": f"undecodable image (OSError: image file is truncated) [{src}]",
                  "nocap": f"no caption [{src}]", "pdf": f"no image (found: pdf) [{src}]",
                  "huge": f"image too large (1500x1000 > max_image_pixels=1000000) [{src}]"}
    old = [{"key": k, "caption": "c", "syn_captions": None if k in old_errors else ["old syn"], "engine": "echo",
            "model": "echo", "prompt": None, "sampling": "{}", "error": old_errors.get(k)}
           for k in expected["000000.tar"]]
    (tmp_path / "out").mkdir()
    old_schema = pa.schema([f for f in OUTPUT_SCHEMA if f.name != "error_code"])
    pq.write_table(pa.Table.from_pylist(old, schema=old_schema), tmp_path / "out" / "000000.parquet")
    cfg = build_config(RecaptionConfig, {"input": str(tmp_path / "in" / "{000000..000001}.tar"),
                                         "output": str(tmp_path / "out"), "decode": {"size": 32},
                                         "engine": {"kind": "echo", "num_captions": 1}})
    summary = run(cfg)
    assert summary["shards"] == {"total": 2, "skipped_done": 1, "written": 1}
    assert pq.read_table(tmp_path / "out" / "000000.parquet").column_names == old_schema.names  # left as it was
    assert summary["stats"]["rows_failed_by_code"] == {"caption_engine_failed": 1, "image_too_large": 1,
                                                       "no_caption": 1, "no_image": 1, "undecodable_image": 1}
    assert summary["stats"]["rows_captioned"] == len(expected["000000.tar"]) - 5 + len(expected["000001.tar"])
    rows = [r for name in ("000000.tar", "000001.tar") for r in read_shard_local(Storage(str(tmp_path / "in" / name)))]
    joined = join_recaptions(pa.Table.from_pylist(rows, schema=SCHEMA), Storage(str(tmp_path / "out")), "synthetic")
    by_key = {r["key"]: r for r in joined.to_pylist()}
    assert (by_key["a0001"]["error_code"], by_key["a0001"]["error"]) == (
        "recaption_failed", "caption_engine_failed: RuntimeError: engine died")
    assert by_key["a0000"]["syn_captions"] == ["old syn"] and by_key["b0000"]["syn_captions"] == ["caption b0"]


def test_s3_input_and_output_via_cli(ray_local, s3_server, tmp_path, capsys):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="web")
    expected = _shards(tmp_path / "in")
    for name in expected:
        s3.upload_file(str(tmp_path / "in" / name), "web", f"shards/{name}")
    cfg = tmp_path / "echo.yaml"
    cfg.write_text("engine: {kind: echo, num_captions: 1, batch_size: 8}\ndecode: {size: 24}\nkeep_images: true\n")
    rc = cli_main(["recaption", "--config", str(cfg), "input=s3://web/shards/*.tar", "output=s3://web/captions",
                   "stats.enabled=false"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["shards"]["written"] == 3 and summary["rows_in"] == sum(len(k) for k in expected.values())
    listed = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="web", Prefix="captions/")["Contents"])
    assert listed == [f"captions/00000{i}.parquet" for i in range(3)]
    body = s3.get_object(Bucket="web", Key="captions/000001.parquet")["Body"].read()
    rows = pq.read_table(io.BytesIO(body)).to_pylist()
    assert [r["key"] for r in rows] == expected["000001.tar"]
    assert rows[0]["syn_captions"] == ["caption b0"]
    assert rows[0]["image_bytes"] == jpeg_bytes(1000)  # keep_images copies the original bytes


def test_decode_runs_in_cpu_tasks_not_in_the_captioner_actors(ray_local, tmp_path):
    from clipdense.recaption.engines.resolve import resolve_engine
    from clipdense.recaption.pipeline import build_dataset

    keys = _shards(tmp_path / "in")["000001.tar"]
    cfg = build_config(RecaptionConfig, {"input": "x", "output": "y", "engine": {"kind": "echo", "num_captions": 1}})
    shards = expand_shards(Storage(str(tmp_path / "in" / "000001.tar")))
    ds = build_dataset(shards, resolve_engine(cfg.engine, cfg.decode, remote=False), cfg.decode, cfg.fault)
    assert [r["key"] for r in ds.take_all()] == keys
    stats = ds.stats()
    assert "MapBatches(decode_batch):" in stats and "MapBatches(decode_batch)->" not in stats  # not fused


def test_user_errors_are_one_line(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("engine: {kind: coca, model: no-such-model}\n")
    assert cli_main(["recaption", "--config", str(cfg), f"input={tmp_path}", f"output={tmp_path}/o"]) == 2
    assert "unknown open_clip model 'no-such-model'" in capsys.readouterr().err
    assert cli_main(["recaption", "--config", str(cfg), "input=/nonexistent/*.tar", "output=o",
                     "engine.model=coca-tiny"]) == 2
    assert "no input files match" in capsys.readouterr().err
    assert cli_main(["recaption", "input=x", "output=y", "engine.typo=1"]) == 2
    assert "unknown key 'engine.typo'" in capsys.readouterr().err
    assert cli_main(["recaption", "input=x", "output=y", "engine.kind=coca", "engine.model=coca-tiny",
                     f"engine.checkpoint={tmp_path}/missing.pt"]) == 2
    assert "engine.checkpoint: file not found" in capsys.readouterr().err


def test_assembler_handles_interleaved_sources_and_detects_lost_order():
    from clipdense.recaption.plan import Plan
    from clipdense.recaption.writer import ShardAssembler

    plan = Plan(inputs={"a": "/d/a.tar", "b": "/d/b.tar", "p": "/d/p.parquet", "e": "/d/e.tar"},
                outputs={n: f"/o/{n}.parquet" for n in "abpe"}, done=[])
    written = {}
    asm = ShardAssembler(plan, {"engine": "echo", "model": "echo", "prompt": None, "sampling": "{}"},
                         write=lambda t, path: written.setdefault(path, t.column("key").to_pylist()))

    def block(*rows):
        return pa.table({"key": [k for k, _ in rows], "caption": ["c"] * len(rows),
                         "syn_captions": [["c"]] * len(rows), "error_code": pa.nulls(len(rows), pa.string()),
                         "error": pa.nulls(len(rows), pa.string()),
                         "shard": [s for _, s in rows]})
    # Ray's ordered union alternates tar and Parquet blocks; within a source, shards stay contiguous
    for b in (block(("a1", "/d/a.tar")), block(("p1", "/d/p.parquet")), block(("a2", "/d/a.tar"), ("b1", "/d/b.tar")),
              block(("p2", "/d/p.parquet")), block(("b2", "/d/b.tar"))):
        asm.add(b)
    assert written == {"/o/a.parquet": ["a1", "a2"]}
    asm.finish()
    assert written == {"/o/a.parquet": ["a1", "a2"], "/o/p.parquet": ["p1", "p2"], "/o/b.parquet": ["b1", "b2"],
                       "/o/e.parquet": []}  # a shard without rows still gets its (empty) file
    assert asm.counts.rows == 6 and asm.counts.ok == 6
    with pytest.raises(RuntimeError, match="arrived after it was written"):
        asm.add(block(("a3", "/d/a.tar")))
