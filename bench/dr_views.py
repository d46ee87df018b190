"""DataCompDR stored views re-applied from a smaller decode: how far the student's view drifts from the teachers'.

    python -m bench.dr_views [--images 24] [--views 4]

Fixture: synthetic scenes (clipdense.synth) rendered at 640 px, cut to 640x480 and saved as JPEG (quality 90);
per image, views drawn as DataCompDR's generator draws them (RandomResizedCrop(224, bicubic, scale 0.08-1) +
RandAugment(2, 9)). "Exact" is the view re-applied on the full decode, which is bit-identical to torchvision
with the stored parameters (tests/test_pretrain_dr_views.py); "ours" re-applies the same parameters on a JPEG
draft decode at 1/2, 1/4, 1/8 (the stored crop mapped to the smaller image). Figures: mean absolute pixel error
(0-255 scale) and 1 - the cosine between a model's embeddings of the two views. The model is clip-tiny with its image
size forced to 224 and random weights (no pretrained weights are available offline), so the cosine is a
sensitivity figure, not a teacher's; for scale, the same model's 1 - cosine between two different stored views
of one image is the peer (ratio: how many times smaller the re-application drift is). Per-op rows: the crop + that
single op (signed magnitude 9) at the 1/2 decode, to show which RandAugment ops amplify the resampling difference.
Not part of `bench.run`.

Reading: the drift grows with the decode reduction but stays orders of magnitude below the difference between two
stored views; geometric and colour-scale ops pass the resampling difference through unchanged, while the ops that
depend on image statistics (AutoContrast's per-channel min/max, Equalize's histogram, Solarize's threshold) amplify
it, AutoContrast most in embedding terms. A decode at the original size removes all of it (bit-exact).
"""
from __future__ import annotations

import argparse
import io
import sys
import time

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image

from bench.common import load_note, row, write_report
from clipdense.models import create_clip
from clipdense.pretrain.dr_views import RANDAUG_OPS, draw_view, reapply_view
from clipdense.synth.render import render
from clipdense.synth.scene import sample_scene


def _jpegs(n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        rgb = render(sample_scene(rng), 640).rgb[80:560]  # 640 x 480
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _decode(data: bytes, scale: int) -> np.ndarray:
    im = Image.open(io.BytesIO(data))
    if scale > 1:
        im.draft("RGB", (im.size[0] // scale, im.size[1] // scale))
    return np.asarray(im.convert("RGB"))


MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
FULL_SIZE = (640, 480)


class Embedder:
    """clip-tiny at 224 px, random weights: unit image embeddings of a list of views (0-1 tensors)."""

    def __init__(self):
        self.model = create_clip("clip-tiny", force_image_size=224).eval()
        self.mean = torch.tensor(MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(STD).view(1, 3, 1, 1)

    def __call__(self, views: list[torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return self.model.encode_image((torch.stack(views) - self.mean) / self.std, normalize=True)


def _pixel_mae(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Mean absolute pixel error on the 0-255 scale."""
    return float(torch.stack([(x - y).abs().mean() for x, y in zip(a, b)]).mean()) * 255


def draw_stored_views(full: list[np.ndarray], views: int) -> list[tuple[int, list]]:
    """(image index, view params) for `views` views per image, drawn as DataCompDR's generator draws them."""
    stored = []
    for i, px in enumerate(full):
        torch.manual_seed(1000 + i)
        stored += [(i, draw_view(Image.fromarray(px))[0]) for _ in range(views)]
    return stored


def decode_scale_rows(jpegs: list[bytes], stored: list, exact: list[torch.Tensor], embed: Embedder,
                      views: int) -> list[dict]:
    """Per decode reduction: the drift of the re-applied view vs the exact one, against two stored views' gap."""
    e_exact = embed(exact)
    # peer: two different stored views of the same image
    other = torch.stack([e_exact[k + 1] for k in range(0, len(stored), views)])
    same = torch.stack([e_exact[k] for k in range(0, len(stored), views)])
    between_views = float((same * other).sum(1).mean())
    rows = []
    for scale in (2, 4, 8):
        small = [_decode(j, scale) for j in jpegs]
        ours = [reapply_view(small[i], FULL_SIZE, v) for i, v in stored]
        mae = _pixel_mae(exact, ours)
        gap = 1 - (e_exact * embed(ours)).sum(1).double()
        rows.append(row("dr-views", f"embedding 1 - cosine, exact view vs re-applied on a 1/{scale} decode",
                        float(gap.mean()) * 1e4, (1 - between_views) * 1e4, "two different stored views of one image",
                        "1e-4 x (1 - cosine)", higher_is_better=False,
                        notes=f"{len(stored)} views of {len(jpegs)} JPEGs 640x480 (decoded {640 // scale}x"
                              f"{480 // scale}); worst view {float(gap.max()):.2e}; pixel MAE {mae:.2f}/255; "
                              f"clip-tiny at 224 px, random init"))
    return rows


def single_op_rows(jpegs: list[bytes], full: list[np.ndarray], stored: list, embed: Embedder) -> list[dict]:
    """Per RandAugment op: the crop + that op alone (signed magnitude 9), full decode vs a 1/2 decode."""
    small = [_decode(j, 2) for j in jpegs]
    g = torch.Generator().manual_seed(0)
    space = T.RandAugment()._augmentation_space(31, (224, 224))  # torchvision's magnitudes; DataCompDR's bin 9
    rows = []
    for idx, name in enumerate(RANDAUG_OPS):
        mags, signed = space[name]
        mag = float(mags[9]) if mags.ndim else 0.0

        def sign(signed: bool = signed) -> float:
            return -1.0 if signed and torch.randint(2, (1,), generator=g) else 1.0

        views = [(i, [v[0], [[idx, mag * sign()]]]) for i, v in stored]
        a = [reapply_view(full[i], FULL_SIZE, v) for i, v in views]
        b = [reapply_view(small[i], FULL_SIZE, v) for i, v in views]
        mae = _pixel_mae(a, b)
        gap = 1 - (embed(a) * embed(b)).sum(1).double()
        rows.append(row("dr-views", f"crop + {name} only, 1/2 decode: embedding 1 - cosine", float(gap.mean()) * 1e4,
                        None, "", "1e-4 x (1 - cosine)", notes=f"pixel MAE {mae:.2f}/255; worst view "
                                                               f"{float(gap.max()):.2e}"))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--views", type=int, default=4)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    embed = Embedder()
    t0 = time.time()
    jpegs = _jpegs(args.images)
    full = [_decode(j, 1) for j in jpegs]
    stored = draw_stored_views(full, args.views)
    exact = [reapply_view(full[i], FULL_SIZE, v) for i, v in stored]
    rows = decode_scale_rows(jpegs, stored, exact, embed, args.views)
    rows += single_op_rows(jpegs, full, stored, embed)
    rows[-1]["notes"] += f"; {time.time() - t0:.0f}s; {load_note()}"
    print(write_report("dr_views", "DataCompDR stored views from a smaller decode", __doc__, rows))
    return 0

if __name__ == "__main__":
    sys.exit(main())
