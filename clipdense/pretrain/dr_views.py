"""Re-applying DataCompDR's stored augmentations (`paug.json`) so the student sees the view the teachers embedded.

DataCompDR's generator (apple/ml-mobileclip-dr `scripts/gen.py`, transforms of apple/ml-dr) made each stored view
of an image as, in order: torchvision `RandomResizedCrop(224, bicubic)` on the original PIL image (RGB), then
`RandAugment(num_ops=2, magnitude=9, num_magnitude_bins=31, interpolation=NEAREST, p=1)` on the PIL crop, then
`ToTensor`; the teachers' `image_emb[k]` embeds view k. `param_aug` stores, per view, the compressed parameters
of the transforms that have random ones: `[[top, left, height, width], [[op index, signed magnitude], ...]]`
(crop box in the original image's pixels; op index into `RANDAUG_OPS`; the RandAugment entry is null when it was
skipped).

`reapply_view` replays a view with torchvision's own ops on a PIL image, so on an image decoded at its original
size the result is bit-identical to the generator's (tests/test_pretrain_dr_views.py checks every op against
torchvision's RandAugment). What cannot be reproduced exactly:
- the crop from a smaller decode (a JPEG draft-decoded at 1/2^k, or an image already shrunk): the stored box is
  scaled to the decoded image and resampled from fewer pixels, so the view is a slightly blurrier resampling of
  the same region. This is the only mismatch on the training path; its effect on embeddings is measured in
  bench/results/dr_views.md. Every RandAugment op then runs exactly as stored on that crop, but the ops that
  depend on image statistics (AutoContrast: per-channel min/max; Equalize: the histogram; Solarize: a threshold)
  amplify the resampling difference, AutoContrast most.
- a student resolution S other than the stored 224: TranslateX/Y magnitudes are pixels of the 224 view and are
  rescaled by S/224 (the other ops are resolution-free), so the view covers the same content at another grid.
- decoder differences the parameters cannot capture (another libjpeg/Pillow, an EXIF rotation the generator did
  not apply: it opened images with plain PIL, RGBA -> RGB).
"""
from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

# torchvision's RandAugment applies its ops through this function; DataCompDR's generator called it directly too
from torchvision.transforms.autoaugment import _apply_op

from clipdense.data.dr_augment import RANDAUG_OPS, STORED_SIZE, draw_view  # noqa: F401  (draw_view: re-exported)

_TRANSLATE = ("TranslateX", "TranslateY")


def parse_views(aug_params) -> list:
    """`param_aug` (the JSON string as stored, or already parsed) -> the list of per-view parameters."""
    views = aug_params
    for _ in range(2):  # stored as a JSON string of the list (some writers nest it once more)
        if isinstance(views, (str, bytes)):
            views = json.loads(views)
    if not isinstance(views, list) or not views or not all(isinstance(v, list) and v for v in views):
        raise ValueError(f"param_aug is not a list of views: {str(aug_params)[:80]!r}")
    return views


def view_ops(view) -> list[tuple[str, float]]:
    """The RandAugment (op name, magnitude) pairs of one stored view ([] when it was skipped)."""
    ops = view[1] if len(view) > 1 else None
    out = []
    for op in ops or []:
        idx, mag = int(op[0]), float(op[1])
        if not 0 <= idx < len(RANDAUG_OPS):
            raise ValueError(f"RandAugment op index {idx} outside 0..{len(RANDAUG_OPS) - 1}")
        out.append((RANDAUG_OPS[idx], mag))
    return out


def reapply_view(image: np.ndarray, orig_size: tuple[int, int], view, size: int = STORED_SIZE,
                 stored_size: int = STORED_SIZE) -> torch.Tensor:
    """One stored view of `image` (H, W, 3 uint8, the original image possibly decoded smaller) whose original size
    is `orig_size` = (orig_w, orig_h): the stored crop mapped to the decoded image, resized to size x size
    (bicubic), then the stored RandAugment ops. Returns (3, size, size) float in [0, 1] (before normalisation)."""
    img = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), "RGB")
    orig_w, orig_h = int(orig_size[0]), int(orig_size[1])
    top, left, h, w = (int(v) for v in view[0])
    if h <= 0 or w <= 0 or top < 0 or left < 0 or top + h > orig_h or left + w > orig_w:
        raise ValueError(f"stored crop (top {top}, left {left}, {h}x{w}) outside the {orig_w}x{orig_h} original")
    if img.size == (orig_w, orig_h):  # exactly torchvision's RandomResizedCrop with these parameters
        crop = F.resized_crop(img, top, left, h, w, [size, size], InterpolationMode.BICUBIC)
    else:  # the same region in the decoded image's pixels, resampled straight from the sub-pixel box
        sx, sy = img.size[0] / orig_w, img.size[1] / orig_h
        crop = img.resize((size, size), Image.Resampling.BICUBIC,
                          box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy))
    for name, mag in view_ops(view):
        if name in _TRANSLATE and size != stored_size:
            mag = mag * size / stored_size
        crop = _apply_op(crop, name, mag, interpolation=InterpolationMode.NEAREST, fill=None)
    return F.to_tensor(crop)

