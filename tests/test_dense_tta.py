"""Test-time augmentation (`eval.tta`): flip and mmseg's ms+flip for segmentation, flip for depth."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from dense_files import write_ade, write_nyu
from PIL import Image
from torch import nn

from clipdense.config import ConfigError, load_config
from clipdense.dense.backbones import create_backbone
from clipdense.dense.base_config import BackboneConfig
from clipdense.dense.config import FinetuneConfig
from clipdense.dense.evaluate import evaluate_depth, evaluate_seg, rescore_seg
from clipdense.dense.inference import MS_SCALES, slide_predict, tta_predict, tta_views, whole_predict
from clipdense.dense.tasks import build_eval_dataset
from clipdense.dense.tasks.seg.config import SegFinetune
from clipdense.dense.tasks.seg.head import SegModel


class Pixelwise(nn.Module):
    """A real 1x1 conv on the uint8 image: each output pixel sees only its own input pixel, so the prediction is
    equivariant to mirroring (and, on a constant image, to rescaling)."""

    def __init__(self, out: int = 4, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, out, 1)

    @torch.no_grad()
    def predict(self, img: torch.Tensor) -> torch.Tensor:
        return self.conv(img.float() / 255.0)


def test_views():
    assert tta_views("none") == [(1.0, False)]
    assert tta_views("flip") == [(1.0, False), (1.0, True)]
    ms = tta_views("ms_flip")
    assert len(ms) == 12 and {r for r, _ in ms} == set(MS_SCALES) and sum(f for _, f in ms) == 6


def test_flip_tta_equals_no_tta_for_a_flip_equivariant_predictor():
    img = torch.randint(0, 256, (1, 3, 40, 56), dtype=torch.uint8)
    m = Pixelwise()
    slide = lambda x: slide_predict(m.predict, x, (32, 32), (21, 21))  # noqa: E731
    for predict in (m.predict, slide, lambda x: whole_predict(m.predict, x)):
        plain = tta_predict(predict, img, tta_views("none"), softmax=True)
        flipped = tta_predict(predict, img, tta_views("flip"), softmax=True)
        torch.testing.assert_close(flipped, plain.softmax(1), rtol=1e-5, atol=1e-6)
        assert torch.equal(flipped.argmax(1), plain.argmax(1))
    # A predictor that is not flip-equivariant (a 3x3 conv) gives a different flip average: flip really mirrors.
    torch.manual_seed(1)
    conv3 = nn.Conv2d(3, 4, 3, padding=1)
    asym = lambda x: conv3(x.float() / 255.0)  # noqa: E731
    with torch.no_grad():
        assert not torch.allclose(tta_predict(asym, img, tta_views("flip"), softmax=True),
                                  asym(img).softmax(1), atol=1e-4)


def test_ms_flip_on_a_constant_image_matches_one_view():
    """Every view of a constant image gives the same pixelwise probabilities, resized back to the input size."""
    img = torch.tensor([30, 200, 90], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 24, 40).contiguous()
    m = Pixelwise()
    out = tta_predict(m.predict, img, tta_views("ms_flip"), softmax=True)
    assert out.shape == (1, 4, 24, 40)
    torch.testing.assert_close(out, m.predict(img).softmax(1), rtol=1e-5, atol=1e-6)


def _seg_cfg(root, *extra):
    return load_config(FinetuneConfig, None, [f"data.root={root}", "data.num_classes=3", "eval.test_scale=null",
                                              "eval.crop_size=[32,32]", "eval.stride=[21,21]", *extra])


def test_ms_flip_segmentation_gives_a_valid_map(tmp_path, mode="slide"):
    """mmseg's ms+flip over slide windows of 32 on a 24x32 image: one window up to ratio 1.25, 2x3 at 1.75
    (whole-image views are covered by the pixelwise tests above)."""
    root = tmp_path / "ade"
    write_ade(root, n_train=1, n_val=2, size=(24, 32), num_classes=3)
    cfg = _seg_cfg(root, "eval.tta=ms_flip", f"eval.mode={mode}")
    model = SegModel(create_backbone(BackboneConfig(name="clip-tiny")), num_classes=3, channels=16,
                     aux_channels=8).eval()
    preds = tmp_path / "preds"
    m = evaluate_seg(model, build_eval_dataset(cfg), cfg, torch.device("cpu"), preds)
    assert m["tta"] == "ms_flip" and m["images"] == 2 and 0 <= m["mIoU"] <= 1 and len(m["IoU_per_class"]) == 3
    for p in sorted(preds.iterdir()):
        arr = np.asarray(Image.open(p))
        assert arr.shape == (24, 32) and set(np.unique(arr)) <= {1, 2, 3}  # restored annotation convention
    again = rescore_seg(preds, root, "validation", num_classes=3, reduce_zero=True)
    assert again["mIoU"] == pytest.approx(m["mIoU"])
    base = evaluate_seg(model, build_eval_dataset(cfg), _seg_cfg(root, f"eval.mode={mode}"), torch.device("cpu"))
    assert base["tta"] == "none" and base["images"] == 2


class PixelwiseDepth(Pixelwise):
    def predict(self, img):
        return torch.sigmoid(super().predict(img))[:, 0] * 10.0


def test_depth_flip_tta_equals_no_tta_for_a_flip_equivariant_predictor(tmp_path):
    root = tmp_path / "nyu"
    write_nyu(root, n_train=1, n_test=2, size=(48, 64))
    cfg = load_config(FinetuneConfig, None, ["task=depth", f"data.root={root}"])
    flip_cfg = load_config(FinetuneConfig, None, ["task=depth", f"data.root={root}", "eval.tta=flip"])
    ds, model = build_eval_dataset(cfg), PixelwiseDepth(out=1)
    plain = evaluate_depth(model, ds, cfg, torch.device("cpu"))
    flipped = evaluate_depth(model, ds, flip_cfg, torch.device("cpu"))
    assert plain["tta"] == "none" and flipped["tta"] == "flip"
    assert {k: pytest.approx(v, rel=1e-5) for k, v in plain.items() if k != "tta"} == \
        {k: v for k, v in flipped.items() if k != "tta"}


def test_tta_config():
    assert SegFinetune().eval.tta == "none"
    assert load_config(FinetuneConfig, None, ["eval.tta=ms_flip"]).eval.tta_scales == list(MS_SCALES)
    for extra, msg in ((["task=depth", "eval.tta=ms_flip"], "not supported for task depth"),
                       (["task=det", "eval.tta=flip"], "not supported for task det"),
                       (["eval.tta=multi"], "eval.tta"), (["eval.flip=true"], "eval.flip"),
                       (["eval.tta_scales=[]"], "tta_scales")):
        with pytest.raises(ConfigError, match=msg):
            load_config(FinetuneConfig, None, extra)
    record = json.loads(json.dumps(load_config(FinetuneConfig, None, ["eval.tta=flip"]).model_dump(mode="json")))
    assert record["eval"]["tta"] == "flip"
