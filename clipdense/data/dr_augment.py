"""DataCompDR's augmentation as its generator (apple/ml-mobileclip-dr `scripts/gen.py`, transforms of apple/ml-dr)
draws it, the format-level definition both sides share: the RandAugment op table behind a stored view's op index,
the stored view side, and `draw_view`, which makes one view and its compressed `param_aug` entry
(`[[top, left, height, width], [[op index, signed magnitude], ...]]`). recaption's teachers draw views with it;
pretrain/dr_views.py re-applies what it stored."""
from __future__ import annotations

import torch
import torchvision.transforms as T
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F
from torchvision.transforms.autoaugment import _apply_op

# apple/ml-dr RandAugment.op_names: the stored op index -> torchvision's op name (its _augmentation_space order)
RANDAUG_OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
               "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
STORED_SIZE = 224   # ml-mobileclip configs/datacompdr12m.json: random_resized_crop size


def draw_view(img: Image.Image, size: int = STORED_SIZE, num_ops: int = 2, magnitude: int = 9,
              num_bins: int = 31) -> tuple[list, torch.Tensor]:
    """DataCompDR's generator for one view, drawing from torch's global RNG exactly as torchvision's
    RandomResizedCrop.get_params and RandAugment do: (the compressed view as stored, the view as ToTensor gives
    it). recaption's teachers draw their views with it; tests and the mismatch bench too."""
    top, left, h, w = T.RandomResizedCrop.get_params(img, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
    crop = F.resized_crop(img, top, left, h, w, [size, size], InterpolationMode.BICUBIC)
    space = T.RandAugment(num_ops, magnitude, num_bins)._augmentation_space(num_bins, (size, size))
    ops = []
    for _ in range(num_ops):  # RandAugment.forward's draws, in its order
        idx = int(torch.randint(len(space), (1,)).item())
        mags, signed = space[RANDAUG_OPS[idx]]
        mag = float(mags[magnitude].item()) if mags.ndim > 0 else 0.0
        if signed and torch.randint(2, (1,)):
            mag *= -1.0
        crop = _apply_op(crop, RANDAUG_OPS[idx], mag, interpolation=InterpolationMode.NEAREST, fill=None)
        ops.append([idx, mag])
    return [[top, left, h, w], ops], F.to_tensor(crop)

