import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shard_files import good_samples, jpeg_bytes, write_tar

from clipdense.config import DataError
from clipdense.data.paths import expand_braces, expand_paths, expand_shards
from clipdense.data.shards import SCHEMA, read_shard_local, read_shards, summarize, write_parquet
from clipdense.data.storage import Storage


def test_expand_braces_keeps_padding_and_lists():
    assert expand_braces("s/{000008..000011}.tar") == [f"s/0000{i:02d}.tar" for i in (8, 9, 10, 11)]
    assert expand_braces("{a,b}/{1..2}.tar") == ["a/1.tar", "a/2.tar", "b/1.tar", "b/2.tar"]


def test_expand_paths_globs_dirs_and_errors(tmp_path):
    for i in range(3):
        write_tar(tmp_path / f"{i:06d}.tar", good_samples(f"k{i}", 1))
    (tmp_path / "notes.txt").write_text("x")
    assert len(expand_paths(Storage(str(tmp_path)))) == 3
    assert len(expand_paths(Storage(str(tmp_path / "*.tar")))) == 3
    assert len(expand_paths(Storage(str(tmp_path / "{000000..000001}.tar")))) == 2
    with pytest.raises(DataError, match="000003.tar"):
        expand_paths(Storage(str(tmp_path / "{000002..000003}.tar")))


def test_bad_samples_become_error_rows(tmp_path):
    good = jpeg_bytes(1)
    samples = good_samples("ok", 3) + [
        {"key": "trunc", "jpg": good[: len(good) // 3], "txt": "cut"},
        {"key": "nocap", "jpg": good},
        {"key": "pdf", "pdf": b"%PDF-1.4", "txt": "a document"},
        {"key": "junk", "jpg": b"not an image at all", "txt": "junk"},
    ]
    write_tar(tmp_path / "a.tar", samples)
    rows = {r["key"]: r for r in read_shard_local(Storage(str(tmp_path / "a.tar")), validate="full")}
    assert set(rows) == {"ok0000", "ok0001", "ok0002", "trunc", "nocap", "pdf", "junk"}
    assert all(rows[f"ok000{i}"]["error_code"] is None and rows[f"ok000{i}"]["error"] is None for i in range(3))
    assert rows["trunc"]["error_code"] == "undecodable_image" and rows["trunc"]["error"].startswith("OSError")
    assert rows["nocap"]["error_code"] is None and rows["nocap"]["caption"] is None  # the caption policy decides
    assert (rows["pdf"]["error_code"], rows["pdf"]["error"]) == ("no_image", "found: pdf")
    assert rows["junk"]["error_code"] == "undecodable_image"
    assert rows["junk"]["error"] == "UnidentifiedImageError: cannot identify image file <_io.BytesIO>"
    assert rows["junk"]["shard"].endswith("a.tar")


def test_truncated_tar_keeps_readable_samples(tmp_path):
    path = tmp_path / "t.tar"
    write_tar(path, good_samples("k", 6))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    rows = read_shard_local(Storage(str(path)))
    ok = [r for r in rows if r["error_code"] is None]
    assert 1 <= len(ok) < 6
    assert rows[-1]["error_code"] == "truncated_tar" and rows[-1]["error"]


def test_read_shards_ray_tar_and_parquet_canonical(ray_local, tmp_path):
    write_tar(tmp_path / "000000.tar", good_samples("a", 5))
    write_tar(tmp_path / "000001.tar", good_samples("b", 4) + [{"key": "bad", "jpg": b"xx", "txt": "t"}])
    pq.write_table(pa.table({"key": ["p0", "p1"], "image_bytes": [jpeg_bytes(7), None],
                             "caption": ["x", "y"]}), tmp_path / "extra.parquet")
    specs = [str(tmp_path / "{000000..000001}.tar"), str(tmp_path / "extra.parquet")]
    ds = read_shards(expand_shards([Storage(s) for s in specs]))
    rows = ds.take_all()
    want = {f"a{i:04d}" for i in range(5)} | {f"b{i:04d}" for i in range(4)} | {"bad", "p0", "p1"}
    assert {r["key"] for r in rows} == want
    assert set(rows[0]) == set(SCHEMA.names)
    shards = {r["key"]: r["shard"] for r in rows}
    assert shards["a0000"].endswith("000000.tar") and shards["p0"].endswith("extra.parquet")
    s = summarize(ds)
    assert s["rows"] == 12 and s["ok"] == 10
    assert s["errors"] == {"no_image": 1, "undecodable_image": 1}


def test_parquet_round_trip_atomic(tmp_path):
    rows = [{"key": "k", "image_bytes": b"123", "caption": "c", "syn_captions": ["a", "b"], "meta": None,
             "error_code": None, "error": None, "shard": "s"}]
    out = tmp_path / "o" / "x.parquet"
    write_parquet(rows, Storage(str(out)), schema=SCHEMA)
    assert pq.read_table(out).to_pylist() == [{**r, "aug_params": None, "teacher_emb": None} for r in rows]
    assert not [f for f in os.listdir(out.parent) if f.startswith(".tmp")]


def test_s3_read_and_write(ray_local, s3_server, tmp_path):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="shards-io")  # its own bucket: other tests upload to "web" on the same server
    for i in range(2):
        write_tar(tmp_path / f"{i:06d}.tar", good_samples(f"s{i}_", 3))
        s3.upload_file(str(tmp_path / f"{i:06d}.tar"), "shards-io", f"shards/{i:06d}.tar")
    assert len(expand_paths(Storage("s3://shards-io/shards/{000000..000001}.tar"))) == 2
    assert len(expand_paths(Storage("s3://shards-io/shards/*.tar"))) == 2
    ds = read_shards(expand_shards(Storage("s3://shards-io/shards/{000000..000001}.tar")))
    rows = ds.take_all()
    assert sorted(r["key"] for r in rows) == sorted(f"s{i}_{j:04d}" for i in range(2) for j in range(3))
    assert all(r["shard"].startswith("s3://shards-io/shards/") for r in rows)
    assert read_shard_local(Storage("s3://shards-io/shards/000000.tar"))[0]["caption"] == "caption s0_0"
    write_parquet(rows[:2], Storage("s3://shards-io/out/part.parquet"), schema=SCHEMA)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="shards-io", Prefix="out/")["Contents"]]
    assert keys == ["out/part.parquet"]


def test_a_location_of_an_unsupported_scheme_is_a_one_line_error():
    from clipdense.data.storage import Storage
    with pytest.raises(DataError, match=r"^gs://b/web: gs:// is not supported; use a local path or s3://"):
        Storage("gs://b/web")
    assert Storage("s3://b/web").remote and not Storage("runs/web").remote
