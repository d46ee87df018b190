"""DataCompDR's augmented views, drawn as its generator (apple/ml-mobileclip-dr `scripts/gen.py`) draws them:
torchvision `RandomResizedCrop(224, bicubic)` on the original RGB image, then `RandAugment(2, 9, 31, NEAREST)`,
then `ToTensor`. Each view is stored compressed in the `param_aug` form that pretrain/dr_views.py re-applies:
`[[top, left, height, width], [[op index, signed magnitude], ...]]`. (The draw itself is data/dr_augment.py, shared with
pretrain's re-application.) Views are drawn from a per-row seed, so they do not
depend on batching or actors.
"""
from __future__ import annotations

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from clipdense.data.dr_augment import STORED_SIZE, draw_view

VIEW_SIZE = STORED_SIZE   # teachers with another input side get the view resized


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
