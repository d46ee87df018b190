"""Re-applying DataCompDR's stored views (pretrain/dr_views.py) against torchvision applied with the same draws."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from torchvision.transforms import InterpolationMode

from clipdense.pretrain.dr_views import RANDAUG_OPS, draw_view, parse_views, reapply_view, view_ops


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """A textured RGB image (gradients + blocks + noise), so every op changes pixels."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), ((x // 7 + y // 5) % 2) * 200],
                   -1).astype(np.int32)
    img += rng.integers(0, 40, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def _torchvision_view(img: Image.Image, seed: int, size: int) -> torch.Tensor:
    """The generator's view with torchvision's own classes: RandomResizedCrop(size, bicubic) + RandAugment()."""
    torch.manual_seed(seed)
    tf = T.Compose([T.RandomResizedCrop(size, interpolation=InterpolationMode.BICUBIC), T.RandAugment(),
                    T.ToTensor()])
    return tf(img)


def test_every_op_reapplies_bit_exactly_as_torchvision():
    img = _photo(97, 71)
    seen = set()
    for seed in range(200):
        expected = _torchvision_view(img, seed, 48)
        torch.manual_seed(seed)
        view, drawn = draw_view(img, size=48)
        assert torch.equal(drawn, expected), f"seed {seed}: draw_view does not replay torchvision's draws"
        stored = parse_views(json.dumps([json.loads(json.dumps(view))]))[0]  # through JSON, as paug.json holds it
        got = reapply_view(np.asarray(img), img.size, stored, size=48, stored_size=48)
        assert got.shape == (3, 48, 48) and got.dtype == torch.float32
        assert torch.equal(got, expected), f"seed {seed}: ops {view_ops(stored)}"
        seen.update(name for name, _ in view_ops(stored))
        if seen == set(RANDAUG_OPS):
            break
    assert seen == set(RANDAUG_OPS), f"ops never drawn: {set(RANDAUG_OPS) - seen}"


def test_crop_maps_to_a_smaller_decode():
    """A JPEG draft-decoded at 1/2 gives nearly the same view as the full decode (same region, resampled)."""
    img = _photo(320, 240, seed=3)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    full = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    small_im = Image.open(io.BytesIO(buf.getvalue()))
    small_im.draft("RGB", (160, 120))
    small = np.asarray(small_im.convert("RGB"))
    assert small.shape[:2] == (120, 160)
    view = [[40, 100, 120, 160], [[0, 0.0], [5, 14.0]]]  # a crop + Identity + Rotate
    exact = reapply_view(full, (320, 240), view, size=64)
    ours = reapply_view(small, (320, 240), view, size=64)
    other_region = reapply_view(full, (320, 240), [[0, 0, 120, 160], view[1]], size=64)
    err = (exact - ours).abs().mean().item()
    assert err < 0.03, err
    assert (exact - other_region).abs().mean().item() > 5 * err  # the mapped box is the stored region


def test_translate_scales_with_the_output_size():
    img = np.asarray(_photo(64, 64))
    view = [[0, 0, 64, 64], [[3, 20.0]]]  # TranslateX by 20 px of a 64 px view
    at_64 = reapply_view(img, (64, 64), view, size=64, stored_size=64)
    at_128 = reapply_view(img, (64, 64), view, size=128, stored_size=64)  # shifted by 40 px at 128
    down = torch.nn.functional.interpolate(at_128[None], size=(64, 64), mode="area")[0]
    assert (down[:, :, 25:] - at_64[:, :, 25:]).abs().mean() < 0.08
    assert (at_64[:, :, :20] == 0).all() and (at_128[:, :, :40] == 0).all()  # the exposed band is the fill


@pytest.mark.parametrize("bad, match", [
    ("{}", "not a list of views"),
    (json.dumps(json.dumps([[[0, 0, 10, 10], [[99, 1.0]]]])), "op index 99"),
])
def test_bad_parameters_are_one_line_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        for v in parse_views(bad):
            view_ops(v)


def test_crop_outside_the_original_is_an_error():
    with pytest.raises(ValueError, match="outside the 32x32 original"):
        reapply_view(np.zeros((32, 32, 3), np.uint8), (32, 32), [[20, 0, 20, 10], None])
