"""DataCompDR's augmented views, drawn as its generator (apple/ml-mobileclip-dr `scripts/gen.py`) draws them:
torchvision `RandomResizedCrop(224, bicubic)` on the original RGB image, then `RandAugment(2, 9, 31, NEAREST)`,
then `ToTensor`. Each view is stored compressed in the `param_aug` form that pretrain/dr_views.py re-applies:
`[[top, left, height, width], [[op index, signed magnitude], ...]]`. (Stages are independent packages, so the draw
lives here; tests check it against pretrain's re-application.) Views are drawn from a per-row seed, so they do not
depend on batching or actors.
"""
from __future__ import annotations

import torch
import torchvision.transforms as T
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F
from torchvision.transforms.autoaugment import _apply_op

# apple/ml-dr RandAugment.op_names (the stored op index), torchvision's _augmentation_space order
RANDAUG_OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
               "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
VIEW_SIZE = 224   # DataCompDR's stored view side; teachers with another input side get the view resized


def draw_view(img: Image.Image, size: int = VIEW_SIZE, num_ops: int = 2, magnitude: int = 9,
              num_bins: int = 31) -> tuple[list, torch.Tensor]:
    """One view from torch's global RNG: (its compressed parameters, the view as ToTensor gives it)."""
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


def draw_views(img: Image.Image, k: int, seed: int) -> tuple[list, torch.Tensor]:
    """k views of one image from `seed` (the global RNG is restored afterwards): (params, (k, 3, 224, 224))."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        drawn = [draw_view(img) for _ in range(k)]
    return [p for p, _ in drawn], torch.stack([v for _, v in drawn])


def teacher_input(views: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """(k, 3, 224, 224) views in [0, 1] -> a teacher's input: resized to its side (bicubic, antialiased) where it
    differs, then normalised with its mean / std."""
    if views.shape[-1] != size:
        views = F.resize(views, [size, size], InterpolationMode.BICUBIC, antialias=True)
    return F.normalize(views, list(mean), list(std))
