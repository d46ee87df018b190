"""data.decode_on gpu | worker: encoded rows from Ray Data, decode + reference crop in the collate (gpu_decode.py;
batches.decode_sources for worker, which must give exactly the Ray-side CPU path's pixels).

The device path is torchvision's decode_jpeg on a list; on device "cpu" it is the same code with libjpeg, so these
tests check it here; the `gpu` tests run it on CUDA (nvJPEG) where there is one.
"""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from clipdense.config import DataError, build_config
from clipdense.data.images import crop_source_side, decode_crop_source
from clipdense.pretrain.batches import Collate
from clipdense.pretrain.captions import sample_rng
from clipdense.pretrain.config import PretrainConfig
from clipdense.pretrain.crops import CROP_SCALE, crop_box
from clipdense.pretrain.data import build_datasets, decode_ok
from clipdense.pretrain.gpu_decode import decode_crops
from clipdense.pretrain.run import row_sources

SIZE = 64
MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)


def _photo(w: int, h: int, seed: int) -> np.ndarray:
    """Gradients + a texture (a box shifted by a few pixels shows) + mild noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(rng.uniform(0.2, 1) * yy + rng.uniform(0.2, 1) * xx) % 200 for _ in range(3)], -1)
    texture = 40 * np.sin(xx / rng.uniform(5, 9)) * np.cos(yy / rng.uniform(5, 9))
    return (img + texture[..., None] + rng.normal(0, 6, img.shape)).clip(0, 255).astype(np.uint8)


def _encode(img: np.ndarray, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).convert(mode).save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


# (w, h, format, mode): small and draft-reduced JPEGs, a PNG and a CMYK JPEG; aspects within the crop's ratio range
# (outside it RandomResizedCrop falls back to one fixed centre box, the same every epoch)
ROWS = [(320, 240, "JPEG", "RGB"), (200, 240, "JPEG", "RGB"), (960, 720, "JPEG", "RGB"), (256, 200, "PNG", "RGB"),
        (240, 240, "JPEG", "CMYK")]


def _rows():
    keys = [f"k{i:03d}" for i in range(len(ROWS))]
    datas = [_encode(_photo(w, h, i), fmt, mode) for i, (w, h, fmt, mode) in enumerate(ROWS)]
    return keys, datas


def _cpu_batch(keys, datas) -> dict:
    """What Ray Data's CPU decode ships (decode_ok with crop_source) as a numpy batch."""
    px, sizes = zip(*(decode_crop_source(d, crop_source_side(SIZE, CROP_SCALE[0])) for d in datas))
    arr = np.empty(len(px), dtype=object)
    arr[:] = list(px)
    return {"key": np.array(keys), "caption": np.array(["a photo"] * len(keys), dtype=object),
            "syn_captions": np.array([[]] * len(keys), dtype=object), "pixels": arr,
            "orig_w": np.array([w for w, _ in sizes]), "orig_h": np.array([h for _, h in sizes])}


def _collate(device=None, epoch=3, decode_on="cpu") -> Collate:
    return Collate(model_name="clip-tiny", image_size=SIZE, mean=MEAN, std=STD, policy="real", seed=7, epoch=epoch,
                   decode_on=decode_on, decode_device=device)


def _encoded_batch(keys, datas) -> dict:
    """What Ray Data ships with data.decode_on gpu (decode_ok encoded=True), as a numpy batch."""
    table = pa.table({"key": keys, "image_bytes": pa.array(datas, pa.binary()), "caption": ["a photo"] * len(keys),
                      "syn_captions": pa.array([[]] * len(keys), pa.list_(pa.string())), "meta": [None] * len(keys),
                      "error_code": pa.array([None] * len(keys), pa.string())})
    out = decode_ok(table, SIZE, crop_source=True, encoded=True)
    assert "pixels" not in out.column_names
    return {c: np.array(out.column(c).to_pylist(), dtype=object if c in ("image_bytes", "syn_captions") else None)
            for c in out.column_names}


def _check_against_cpu(device: str):
    keys, datas = _rows()
    ref = _collate()(_cpu_batch(keys, datas))["image"]
    col = _collate(device)
    enc = _encoded_batch(keys, datas)
    assert enc["orig_w"].tolist() == [w for w, *_ in ROWS] and enc["orig_h"].tolist() == [h for _, h, *_ in ROWS]
    out = col(enc)
    got = out["image"]
    assert got.device.type == torch.device(device).type and got.shape == ref.shape
    # the same boxes: within a few levels (decoders' chroma upsampling, float vs uint8 resize) and more for the
    # photo-size JPEG, which the CPU path decodes JPEG-draft reduced before its resize
    level = torch.tensor(STD).view(1, 3, 1, 1) * 255  # normalised units -> 0..255 levels
    diff = [float(d.mean()) for d in (got.cpu() - ref).abs() * level]
    reduced = [min(w, h) > 2 * crop_source_side(SIZE, CROP_SCALE[0]) for w, h, *_ in ROWS]
    assert all(d < (8 if r else 2.5) for d, r in zip(diff, reduced)), diff
    # another epoch draws other boxes: far larger differences (so the check above can fail)
    other = [float(d.mean()) for d in (_collate(device, epoch=4)(enc)["image"].cpu() - ref).abs() * level]
    assert all(o > 2 * d for o, d in zip(other, diff)), (other, diff)
    png = [i for i, r in enumerate(ROWS) if r[2] != "JPEG"]
    assert int(out["decode_fallbacks"]) >= len(png)  # the PNG (and whatever JPEG the decoder refused) on the CPU
    assert out["keys"] == keys and out["texts"][0].shape[0] == len(keys)


def test_device_decode_on_cpu_matches_the_cpu_collate():
    _check_against_cpu("cpu")


def test_worker_decode_is_the_cpu_path_exactly():
    """decode_on worker: the same decode (PIL, JPEG draft), boxes and resize as Ray Data's CPU path, in the collate:
    the batch is identical, PNG and CMYK rows included; another epoch differs."""
    keys, datas = _rows()
    ref = _collate()(_cpu_batch(keys, datas))
    enc = _encoded_batch(keys, datas)
    got = _collate(decode_on="worker")(enc)
    assert torch.equal(got["image"], ref["image"]) and got["keys"] == keys
    assert torch.equal(got["texts"][0], ref["texts"][0]) and "decode_fallbacks" not in got
    assert not torch.equal(_collate(epoch=4, decode_on="worker")(enc)["image"], ref["image"])


def test_decode_crops_boxes_and_fallback():
    keys, datas = _rows()
    origs = [(w, h) for w, h, *_ in ROWS]
    boxes = [crop_box(sample_rng(7, 3, k, 2), h, w) for k, (w, h) in zip(keys, origs)]
    img, n_cpu = decode_crops(datas, origs, boxes, SIZE, "cpu")
    assert img.shape == (len(keys), 3, SIZE, SIZE) and img.dtype == torch.float32
    assert 0 <= float(img.min()) and float(img.max()) <= 255
    assert n_cpu >= 1  # the PNG
    # the whole image as its box: the resized original, as PIL decodes it
    whole = [(0, 0, w, h) for w, h in origs]
    img, _ = decode_crops(datas[3:4], origs[3:4], whole[3:4], SIZE, "cpu")
    pil = np.asarray(Image.open(io.BytesIO(datas[3])).convert("RGB").resize((SIZE, SIZE), Image.BICUBIC))
    assert np.abs(img[0].permute(1, 2, 0).numpy() - pil).mean() < 1.0


def test_broken_pixels_are_a_one_line_error_naming_the_key():
    keys, datas = _rows()
    broken = datas[0][: len(datas[0]) // 3]  # the header parses, the scan is cut short
    batch = {"key": np.array(["good", "cut"]), "caption": np.array(["c", "c"], dtype=object),
             "syn_captions": np.array([[], []], dtype=object),
             "image_bytes": np.array([datas[1], broken], dtype=object),
             "orig_w": np.array([200, 320]), "orig_h": np.array([240, 240])}
    with pytest.raises(DataError, match=r"^cut: undecodable_image: .*validate_images=full"):
        _collate("cpu")(batch)
    with pytest.raises(DataError, match=r"^cut: undecodable_image: .*decode_on worker.*validate_images=full"):
        _collate(decode_on="worker")(batch)


def test_encoded_rows_keep_the_pixel_guard_and_drop_errors():
    keys, datas = _rows()
    table = pa.table({"key": keys, "image_bytes": pa.array(datas[:-1] + [b"not an image"], pa.binary()),
                      "caption": ["c"] * len(keys), "syn_captions": pa.array([[]] * len(keys), pa.list_(pa.string())),
                      "meta": [None] * len(keys), "error_code": pa.array([None, "x"] + [None] * 3, pa.string())})
    out = decode_ok(table, SIZE, crop_source=True, encoded=True, max_pixels=300 * 300)
    # k001 has an error, k002 (960x720) is over the guard, k004 is undecodable
    assert out.column("key").to_pylist() == ["k000", "k003"]
    assert out.column("image_bytes").to_pylist() == [datas[0], datas[3]]


def test_config_decode_on():
    base = {"data": {"shards": "x.tar"}}
    assert build_config(PretrainConfig, base).data.decode_on == "cpu"
    ok = build_config(PretrainConfig, {**base, "data": {"shards": "x.tar", "decode_on": "gpu"},
                                       "train": {"scaling": {"use_gpu": True}}})
    assert ok.data.decode_on == "gpu"
    with pytest.raises(Exception, match="use_gpu"):
        build_config(PretrainConfig, {**base, "data": {"shards": "x.tar", "decode_on": "gpu"}})
    with pytest.raises(Exception, match="decode_on"):
        build_config(PretrainConfig, {"data": {"shards": "x.tar", "decode_on": "tpu"}})
    assert build_config(PretrainConfig, {"data": {"shards": "x.tar", "decode_on": "worker"}}).data.decode_on == "worker"
    with pytest.raises(Exception, match="decode_on worker does not take loss.distill"):
        build_config(PretrainConfig, {"data": {"shards": "x.tar", "decode_on": "worker"},
                                      "captions": {"policy": "both"}, "loss": {"distill": {"enabled": True}}})


@pytest.mark.gpu
def test_device_decode_on_cuda_matches_the_cpu_collate():
    _check_against_cpu("cuda")


def test_ray_data_ships_encoded_rows_the_collate_decodes(ray_local, tmp_path):
    """Through Ray Data (build_datasets): decode_on gpu and worker ship `image_bytes` + original size, not pixels;
    the collate's device decode (here on CPU) gives the CPU path's images for the same keys, worker's exactly."""
    import tarfile

    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(6):
            for ext, data in (("jpg", _encode(_photo(96 + 8 * i, 88, i))), ("txt", f"photo {i}".encode())):
                info = tarfile.TarInfo(f"{i:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    batches = {}
    for on in ("cpu", "gpu", "worker"):
        cfg = build_config(PretrainConfig, {"data": {"shards": str(shard), "decode_on": on, "count_errors": False},
                                            "train": {"scaling": {"use_gpu": on == "gpu"}},
                                            "ray": {"in_process": True}})
        train, _, _ = build_datasets(*row_sources(cfg.data, cfg.eval, cfg.captions.policy), cfg.data, cfg.eval, SIZE)
        batches[on] = train.take_batch(6, batch_format="numpy")  # runs to the end: no executor left behind
    enc = batches["gpu"]
    assert "pixels" not in enc and all(isinstance(d, bytes) and d[:2] == b"\xff\xd8" for d in enc["image_bytes"])
    assert enc["key"].tolist() == batches["cpu"]["key"].tolist() == [f"{i:05d}" for i in range(6)]
    assert enc["orig_w"].tolist() == [96 + 8 * i for i in range(6)] and set(enc["orig_h"].tolist()) == {88}
    got, ref = _collate("cpu")(enc)["image"], _collate()(batches["cpu"])["image"]
    assert float(((got - ref).abs() * torch.tensor(STD).view(1, 3, 1, 1) * 255).mean()) < 2.5
    assert batches["worker"]["image_bytes"].tolist() == enc["image_bytes"].tolist()
    assert torch.equal(_collate(decode_on="worker")(batches["worker"])["image"], ref)
