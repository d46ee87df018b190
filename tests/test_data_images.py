"""data/images.py (opening, the pixel guard, decoding) and data/rows.py (structured row errors), without Ray."""
import importlib
import io
import json
import pkgutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from shard_files import jpeg_bytes, write_tar

import clipdense
from clipdense.data.images import ImageError, check_image, decode_rgb, decode_square, open_image, shrink_jpeg
from clipdense.data.rows import CODES, count_codes, error_columns, errors_from, parse_legacy, row_error
from clipdense.data.shards import read_shard_local
from clipdense.data.storage import Storage
from clipdense.recaption.writer import RunCounts

PIL_DEFAULT_LIMIT = int(1024 * 1024 * 1024 // 4 // 3)  # PIL's own MAX_IMAGE_PIXELS


def _png(size, mode="L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


def bomb_header(w: int, h: int) -> bytes:
    """A 10x10 PNG whose header declares w x h: what a decompression bomb shows before its pixels are inflated.
    Its pixel data is that of 10x10, so any attempt to decode it fails as truncated, not as too large."""
    png = _png((10, 10))
    body = b"IHDR" + struct.pack(">II", w, h) + png[24:29]
    return png[:12] + body + struct.pack(">I", zlib.crc32(body)) + png[33:]


def test_bomb_is_rejected_from_its_header_before_decode():
    for w, h in ((10_000, 10_000), (20_000, 20_000)):  # above PIL's limit; above twice it (where PIL refuses)
        with pytest.raises(ImageError) as e:
            decode_square(bomb_header(w, h), 32)
        assert e.value.code == "image_too_large"
        assert check_image(bomb_header(w, h), "header").code == "image_too_large"
        assert check_image(bomb_header(w, h), "full").code == "image_too_large"
    assert check_image(bomb_header(10_000, 10_000)).detail == "10000x10000 > max_image_pixels=89478485"
    # a configured limit decides, both ways: below PIL's own, and above it (PIL's lifted for the call only)
    big = _png((1500, 1000))
    assert check_image(big, "full", max_pixels=1_000_000).detail == "1500x1000 > max_image_pixels=1000000"
    assert decode_square(big, 16, max_pixels=2_000_000).shape == (16, 16, 3)
    with pytest.raises(ImageError) as e:
        decode_square(bomb_header(20_000, 20_000), 32, max_pixels=10**9)
    assert e.value.code == "undecodable_image" and "truncated" in e.value.detail  # allowed, so decoding was tried
    assert Image.MAX_IMAGE_PIXELS == PIL_DEFAULT_LIMIT


def test_bomb_in_a_shard_is_a_row_error(tmp_path):
    write_tar(tmp_path / "s.tar", [{"key": "bomb", "png": bomb_header(30_000, 30_000), "txt": "x"},
                                   {"key": "ok", "jpg": jpeg_bytes(1), "txt": "y"}])
    rows = {r["key"]: r for r in read_shard_local(Storage(str(tmp_path / "s.tar")), validate="header")}
    assert rows["bomb"]["error_code"] == "image_too_large" and rows["ok"]["error_code"] is None


def test_dense_file_readers_use_the_guard(tmp_path):
    from clipdense.config import DataError
    from clipdense.dense.dataset_common import read_png, read_rgb

    (tmp_path / "bomb.png").write_bytes(bomb_header(10_000, 10_000))
    (tmp_path / "junk.jpg").write_bytes(b"junk")
    (tmp_path / "depth.png").write_bytes(_png((6, 4), "I;16"))
    with pytest.raises(DataError, match=r"bomb.png: image too large \(10000x10000 > max_image_pixels=89478485\)"):
        read_rgb(tmp_path / "bomb.png")
    with pytest.raises(DataError, match=r"junk.jpg: unreadable image \(UnidentifiedImageError"):
        read_rgb(tmp_path / "junk.jpg")
    with pytest.raises(DataError, match="bomb.png: depth too large"):
        read_png(tmp_path / "bomb.png", "depth")
    depth = read_png(tmp_path / "depth.png", "depth")
    assert depth.shape == (4, 6) and depth.dtype == np.uint16


def test_importing_every_module_leaves_pils_limit_alone():
    for m in pkgutil.walk_packages(clipdense.__path__, "clipdense."):
        importlib.import_module(m.name)
    assert Image.MAX_IMAGE_PIXELS == PIL_DEFAULT_LIMIT
    decode_rgb(_png((20, 20)), max_pixels=10**9)  # a lifted limit is restored after the call
    assert Image.MAX_IMAGE_PIXELS == PIL_DEFAULT_LIMIT


def test_decode_helpers_keep_their_geometry():
    sq = decode_square(jpeg_bytes(3, 100), 48)
    assert sq.shape == (48, 48, 3) and sq.dtype == np.uint8
    full = decode_square(jpeg_bytes(3, 400), 48, draft=False)
    drafted = decode_square(jpeg_bytes(3, 400), 48)  # DCT-domain 1/8 decode: close to, not equal to, full
    assert not np.array_equal(full, drafted) and np.abs(full.astype(int) - drafted).mean() < 20
    small = shrink_jpeg(jpeg_bytes(2, 120), 60 * 60)
    assert np.prod(Image.open(io.BytesIO(small)).size) <= 3600
    assert decode_rgb(_png((7, 5), "RGBA")).mode == "RGB"
    with pytest.raises(ImageError, match="no_image"):
        open_image(b"")


def test_legacy_error_strings_parse_to_codes():
    cases = {
        "undecodable image (UnidentifiedImageError: cannot identify image file <_io.BytesIO object at 0x7f3a>) [a]":
            ("undecodable_image", "UnidentifiedImageError: cannot identify image file <_io.BytesIO>", "a"),
        "image too large (1500x1000 > max_image_pixels=1000000) [s3://b/x.tar]":
            ("image_too_large", "1500x1000 > max_image_pixels=1000000", "s3://b/x.tar"),
        "no image (found: pdf) [a]": ("no_image", "found: pdf", "a"),
        "no caption [a]": ("no_caption", CODES["no_caption"], "a"),
        "truncated or corrupt tar (ReadError) [a]": ("truncated_tar", "ReadError", "a"),
        "no recaption file for shard [a]": ("no_recaption_file", CODES["no_recaption_file"], "a"),
        "recaption failed (caption engine failed (RuntimeError: x) [a]) [b]":
            ("recaption_failed", "caption engine failed (RuntimeError: x) [a]", "b"),
        "caption engine failed (RuntimeError: boom (inner)) [a]":
            ("caption_engine_failed", "RuntimeError: boom (inner)", "a"),
        "engine failed": ("engine_failed", "engine failed", None),
    }
    for text, expected in cases.items():
        e = parse_legacy(text)
        assert (e.code, e.detail, e.shard) == expected, text
    assert set(c for c, _, _ in cases.values()) - {"engine_failed"} <= set(CODES)


def test_errors_counted_by_code_in_both_formats():
    new = pa.table({"key": ["a", "b", "c"], **error_columns([None, row_error("no_caption"),
                                                               row_error("undecodable_image", "OSError: x")])})
    old = pa.table({"key": ["d", "e"], "error": [None, "undecodable image (OSError: y) [s]"]})
    counts = RunCounts()
    counts.add(new)
    counts.add(old)
    assert (counts.rows, counts.ok, counts.errors) == (5, 2, {"no_caption": 1, "undecodable_image": 2})
    assert count_codes([None, "b", "a", "b"]) == (1, {"a": 1, "b": 2})
    assert errors_from({"key": np.array(["x"], object)}) == [None]  # no error columns: every row fine
    assert errors_from(new)[2].detail == "OSError: x"
    with pytest.raises(ValueError, match="snake_case"):
        row_error("Not A Code")


_RUN = """
import json, sys
from clipdense.data.images import ImageError, decode_square
from clipdense.data.shards import read_shard_local
from clipdense.data.storage import Storage
rows = read_shard_local(Storage(sys.argv[1]), validate="full")
out = [[r["key"], r["error_code"], r["error"]] for r in rows]
for r in rows:
    try:
        decode_square(r["image_bytes"], 16)
    except ImageError as e:
        out.append([r["key"], e.code, e.detail])
print(json.dumps(out))
"""


def test_error_texts_are_identical_across_runs(tmp_path):
    good = jpeg_bytes(5, 64)
    write_tar(tmp_path / "bad.tar", [
        {"key": "junk", "jpg": b"not an image at all", "txt": "a"},
        {"key": "cut", "jpg": good[: len(good) // 2], "txt": "b"},
        {"key": "zero", "png": b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "txt": "c"},
        {"key": "webp", "webp": b"RIFF\0\0\0\0WEBPVP8 ", "txt": "d"},
        {"key": "fine", "jpg": good, "txt": "e"},
    ])
    runs = [subprocess.run([sys.executable, "-c", _RUN, str(tmp_path / "bad.tar")], capture_output=True, text=True,
                           check=True).stdout for _ in range(2)]
    assert runs[0] == runs[1]
    errors = json.loads(runs[0])
    assert {k for k, code, _ in errors if code} == {"junk", "cut", "zero", "webp"}
    assert not any("0x" in (detail or "") for _, _, detail in errors)
