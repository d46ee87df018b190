"""Fuzzing the tar shard reader and the recaption decode with randomly corrupted real tar files (hypothesis).

Each example writes a real webdataset tar (duplicate keys, empty members, non-UTF-8 names and captions, images whose
headers declare huge sizes), corrupts it (cut, bad header bytes, byte flips, a zeroed header, data after the end),
and checks the reader against an independent model of what must come out: no exception; every sample whose members
were read before the break is a row, in order; a repeated key keeps its first sample and is a `duplicate_key` row;
the unreadable rest is one `truncated_tar`/`corrupt_tar` row naming the shard and the byte offset; and the rows then
go through the recaption decode, where a decompression bomb is refused before any pixel is decoded.
Reproducible: `derandomize=True` and no example database.
"""
from __future__ import annotations

import io
import struct
import tarfile
import zlib

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from shard_files import good_samples, jpeg_bytes, write_tar

from clipdense.data.images import check_image
from clipdense.data.paths import expand_shards
from clipdense.data.shards import read_shard_local, read_shards, summarize
from clipdense.data.storage import Storage
from clipdense.data.tar_rows import IMAGE_EXTS, SCHEMA, iter_tar_samples
from clipdense.recaption.decode import ImageInput
from clipdense.recaption.pipeline import decode_batch

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is in the `test` extra")
from hypothesis import HealthCheck, assume, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

MAX_PIXELS = 10_000  # the pixel guard for these runs: tiny real images pass, declared sizes above it are bombs
FUZZ = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SHARD = "/fuzz/000000.tar"


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), 127, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _declare_png(data: bytes, w: int, h: int) -> bytes:
    """A real PNG whose IHDR (CRC fixed up) declares w x h: only the header says so, the pixel data stays small."""
    ihdr = data[12:16] + struct.pack(">II", w, h) + data[24:29]
    return data[:8] + data[8:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + data[33:]


def _declare_jpeg(data: bytes, w: int, h: int) -> bytes:
    """A real JPEG whose SOF0 segment declares w x h."""
    sof = data.index(b"\xff\xc0")
    return data[:sof + 5] + struct.pack(">HH", h, w) + data[sof + 9:]


SMALL_JPEG, SMALL_PNG = jpeg_bytes(3, 24), _png(20, 12)
BOMB_SIZES = st.integers(1, 65535).flatmap(lambda w: st.tuples(st.just(w), st.integers(MAX_PIXELS // w + 1, 65535)))


@st.composite
def image_bytes(draw):
    kind = draw(st.sampled_from(["jpeg", "png", "empty", "junk", "bomb_png", "bomb_jpeg", "cut"]))
    if kind in ("bomb_png", "bomb_jpeg"):
        w, h = draw(BOMB_SIZES)
        return (_declare_png(SMALL_PNG, w, h) if kind == "bomb_png" else _declare_jpeg(SMALL_JPEG, w, h)), True
    return {"jpeg": SMALL_JPEG, "png": SMALL_PNG, "empty": b"", "cut": SMALL_JPEG[:len(SMALL_JPEG) // 2],
            "junk": draw(st.binary(min_size=1, max_size=40))}[kind], False


TEXT = st.one_of(st.text(max_size=30).map(lambda t: t.encode()),    # UTF-8, maybe blank
                 st.binary(max_size=30),                            # mostly not UTF-8
                 st.just(b"\xffcaption \xfe\xfd in latin-1 \xe9"))
KEYS = st.sampled_from([b"a", b"b", b"c", b"d", b"sub/e", b"\xff\xfek", b"k\xe9y"])  # a repeat is a duplicate


@st.composite
def members(draw):
    """[(name bytes, data, declares a bomb)] of a webdataset tar: samples of 1-4 members, plus odd members."""
    out = []
    for _ in range(draw(st.integers(0, 7))):
        key = draw(KEYS)
        for ext in draw(st.lists(st.sampled_from(["jpg", "png", "txt", "json", "cls", "syn.json"]), min_size=1,
                                 max_size=4, unique=True)):
            if ext in ("jpg", "png"):
                data, bomb = draw(image_bytes())
            else:
                data, bomb = draw(TEXT), False
            out.append((key + b"." + ext.encode(), data, bomb))
        if draw(st.integers(0, 5)) == 0:
            out.append((draw(st.sampled_from([b"_stats.json", b"README", b".jpg"])), b"{}", False))
    return out


def write_members(items) -> tuple[bytes, list[tuple[int, int, int]], int]:
    """A GNU-format tar (one 512-byte header per member, names as raw bytes) -> (bytes, [(header, data end,
    padded end)], offset of the end-of-archive marker)."""
    buf, layout = io.BytesIO(), []
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as tar:
        for name, data, _ in items:
            info = tarfile.TarInfo(name.decode("utf-8", "surrogateescape"))
            info.size = len(data)
            start = tar.offset
            tar.addfile(info, io.BytesIO(data))
            layout.append((start, start + tarfile.BLOCKSIZE + len(data), tar.offset))
        end = tar.offset
    return buf.getvalue(), layout, end


CORRUPTIONS = st.one_of(
    st.tuples(st.just("cut"), st.floats(0, 1)),
    st.tuples(st.just("header"), st.integers(0, 50), st.integers(0, 511), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=3)),
    st.tuples(st.just("zero_header"), st.integers(0, 50)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=600)),
    st.tuples(st.just("none")),
)


def corrupt(blob: bytes, layout, end: int, how) -> bytes:
    """Positions are drawn over the members and the end-of-archive marker, not the record padding after it."""
    b = bytearray(blob)
    if how[0] == "cut":
        return blob[:int(how[1] * (end + 512))]
    if how[0] in ("header", "zero_header") and layout:
        h = layout[how[1] % len(layout)][0]
        if how[0] == "zero_header":
            b[h:h + 512] = bytes(512)
        else:
            at = h + how[2]
            b[at:at + len(how[3])] = how[3][:h + 512 - at]
    elif how[0] == "flip":
        for frac, value in how[1]:
            b[min(int(frac * (end + 512)), len(b) - 1)] = value
    elif how[0] == "append":
        b += how[1]
    return bytes(b)


def expected_break(blob: bytes, layout, end: int, original: bytes) -> tuple[int, str | None, int | None]:
    """(members read intact, break code, break offset) by the tar format's rules: the reader must stop at the first
    header that is cut, invalid or zero-with-data-after, or at member data that is cut."""
    def stop_at(pos: int, i: int):
        block = blob[pos:pos + 512]
        if len(block) < 512:
            return i, "truncated_tar", pos
        if block.count(0) == 512:
            return (i, None, None) if blob[pos + 512:].count(0) == len(blob) - pos - 512 else (i, "corrupt_tar", pos)
        return None

    for i, (h, data_end, padded_end) in enumerate(layout):
        stop = stop_at(h, i)
        if stop:
            return stop
        try:
            got = tarfile.TarInfo.frombuf(blob[h:h + 512], "utf-8", "replace")
        except tarfile.HeaderError:
            return i, "corrupt_tar", h
        want = tarfile.TarInfo.frombuf(original[h:h + 512], "utf-8", "replace")
        assume((got.name, got.size, got.type) == (want.name, want.size, want.type))  # else a different valid tar
        if len(blob) < data_end:
            return i, "truncated_tar", h
        if len(blob) < padded_end:
            return i + 1, "truncated_tar", padded_end
    return stop_at(end, len(layout)) or (len(layout), "corrupt_tar", end)


def expected_rows(items, blob, layout, n_read, validate):
    """[(key, error_code, image, caption, declares a bomb)] for the members read, grouped and deduplicated as
    documented."""
    groups, seen, out = [], set(), []
    for (name, data, bomb), (h, data_end, _) in zip(items[:n_read], layout):
        base, dot, ext = name.decode("utf-8", "replace").rsplit("/", 1)[-1].partition(".")
        if not dot or not base or base.startswith("_"):
            continue
        if not groups or groups[-1][0] != base or ext.lower() in groups[-1][2]:
            groups.append((base, h, {}, set()))
        groups[-1][2][ext.lower()] = blob[h + 512:data_end]
        if bomb and blob[h + 512:data_end] == data:  # a flip may have broken the declared size
            groups[-1][3].add(ext.lower())
    for key, start, files, bombs in groups:
        if key in seen:
            out.append((f"{key}#duplicate@{start}", "duplicate_key", None, None, False))
            continue
        seen.add(key)
        image_ext = next((e for e in IMAGE_EXTS if e in files), None)
        caption = files["txt"].decode("utf-8", "replace").strip() if "txt" in files else None
        if image_ext is None:
            code = "no_image"
        elif image_ext in bombs and validate != "none":
            code = "image_too_large"
        else:
            problem = check_image(files[image_ext], validate, MAX_PIXELS)
            code = problem.code if problem else None
        if code is None and not caption:
            code = "no_caption?"  # the reader may leave the caption policy to later stages
        out.append((key, code, files.get(image_ext), caption or None, image_ext in bombs))
    return out


@FUZZ
@given(items=members(), how=CORRUPTIONS, validate=st.sampled_from(["none", "header", "full"]))
def test_corrupted_tars_account_for_every_sample(items, how, validate):
    original, layout, end = write_members(items)
    blob = corrupt(original, layout, end, how)
    n_read, code, offset = expected_break(blob, layout, end, original)

    rows = list(iter_tar_samples(io.BytesIO(blob), SHARD, validate, MAX_PIXELS))
    table = pa.Table.from_pylist(rows, schema=SCHEMA)  # every row is valid Arrow (no surrogates in keys)

    want = expected_rows(items, blob, layout, n_read, validate)
    event(f"{how[0]}: {code}")  # the spread of cases (pytest --hypothesis-show-statistics)
    event(f"{sum(w[1] == 'duplicate_key' for w in want) > 0} duplicates, {sum(w[4] for w in want) > 0} bombs")
    sample_rows = rows[:-1] if code else rows
    assert [r["key"] for r in sample_rows] == [w[0] for w in want]
    for r, w in zip(sample_rows, want):
        assert r["error_code"] in ((None, "no_caption") if w[1] == "no_caption?" else (w[1],))
        assert r["shard"] == SHARD and (r["error"] is None) == (r["error_code"] is None)
        if w[1] != "duplicate_key":
            assert (r["image_bytes"], r["caption"] or None) == w[2:4]
        if w[1] == "image_too_large":
            assert "max_image_pixels" in r["error"]
    if code:
        last = rows[-1]
        assert (last["key"], last["error_code"], last["shard"]) == (f"{SHARD}#{code}@{offset}", code, SHARD)
        assert f"byte {offset}" in last["error"]
    assert len({r["key"] for r in rows}) == len(rows)

    # the recaption decode: no exception, one output row per input row, a declared bomb refused, errors kept
    bombs = {r["key"] for r, w in zip(sample_rows, want) if w[4] and r["error_code"] is None}
    for spec in (ImageInput(size=8, max_image_pixels=MAX_PIXELS),
                 ImageInput(mode="jpeg", max_pixels=64, max_image_pixels=MAX_PIXELS)):
        out = decode_batch(table, spec).to_pylist()
        assert [r["key"] for r in out] == [r["key"] for r in rows]
        for before, after in zip(rows, out):
            if before["error_code"] is not None:
                assert (after["error_code"], after["error"]) == (before["error_code"], before["error"])
            elif before["key"] in bombs:  # its pixel data is a 20x12 image's: decoding it would fail as undecodable
                assert after["error_code"] == "image_too_large"
            elif validate == "full":  # the image decodes; only a caption policy may still refuse the row
                assert after["error_code"] in ((None, "no_caption") if not before["caption"] else (None,))


def test_duplicate_keys_keep_the_first(tmp_path):
    samples = good_samples("k", 3)
    write_tar(tmp_path / "d.tar", samples + [dict(samples[1], txt="second copy"), dict(samples[1], txt="third")])
    rows = read_shard_local(Storage(str(tmp_path / "d.tar")))
    assert [r["error_code"] for r in rows] == [None, None, None, "duplicate_key", "duplicate_key"]
    assert rows[1]["caption"] == "caption k1"
    assert rows[3]["key"].startswith("k0001#duplicate@") and rows[3]["error"].startswith("key k0001 again at byte")


def test_ray_read_reports_each_break_once(ray_local, tmp_path):
    """The same rows through Ray Data's datasource as without Ray, for a cut and a corrupt shard."""
    for i in range(3):
        write_tar(tmp_path / f"{i:06d}.tar", good_samples(f"s{i}_", 4))
    cut = (tmp_path / "000001.tar").read_bytes()
    (tmp_path / "000001.tar").write_bytes(cut[:len(cut) // 2 + 100])
    bad = bytearray((tmp_path / "000002.tar").read_bytes())
    with tarfile.open(tmp_path / "000002.tar") as tar:
        bad[tar.getmembers()[4].offset + 7] ^= 0xFF  # a later header: where Python's tarfile would stop silently
    (tmp_path / "000002.tar").write_bytes(bytes(bad))
    local = [r for i in range(3) for r in read_shard_local(Storage(str(tmp_path / f"{i:06d}.tar")))]
    ds = read_shards(expand_shards(Storage(str(tmp_path / "{000000..000002}.tar"))))
    assert sorted(r["key"] for r in ds.take_all()) == sorted(r["key"] for r in local)
    s = summarize(ds)
    codes = [r["error_code"] for r in local]
    assert s["errors"]["corrupt_tar"] == s["errors"]["truncated_tar"] == 1
    assert s["errors"] == {c: codes.count(c) for c in set(codes) - {None}}  # + a sample cut short: no_caption
    assert s["ok"] == codes.count(None) < 12 and s["rows"] == len(local)
