"""DataCompDR's augmented views, drawn as its generator (apple/ml-mobileclip-dr `scripts/gen.py`) draws them:
torchvision `RandomResizedCrop(224, bicubic)` on the original RGB image, then `RandAugment(2, 9, 31, NEAREST)`,
then `ToTensor`. Each view is stored compressed in the `param_aug` form that pretrain/dr_views.py re-applies:
`[[top, left, height, width], [[op index, signed magnitude], ...]]`. (The draw itself is data/dr_augment.py, shared with
pretrain's re-application.) Views are drawn from a per-row seed, so they do not
depend on batching or actors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from clipdense.data.dr_augment import STORED_SIZE, draw_view
from clipdense.data.images import decode_rgb
from clipdense.recaption.engines.seeds import row_seed

VIEW_SIZE = STORED_SIZE   # teachers with another input side get the view resized


def draw_views(img: Image.Image, k: int, seed: int, uint8: bool = False) -> tuple[list, torch.Tensor]:
    """k views of one image from `seed` (the global RNG is restored afterwards): (params, (k, 3, 224, 224)), in
    [0, 1] or, with `uint8`, as bytes."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        drawn = [draw_view(img, uint8=uint8) for _ in range(k)]
    return [p for p, _ in drawn], torch.stack([v for _, v in drawn])


@dataclass
class ViewBatch:
    """The teachers' inputs of a run of rows, drawn on the CPU before any model runs: each row's views' `param_aug`
    entries, the views as bytes (n, k, 3, 224, 224) and the scorer's eval-transform input (n, 3, S, S)."""
    params: list
    views: torch.Tensor
    scored: torch.Tensor

    def take(self, idx: list[int]) -> "ViewBatch":
        return ViewBatch([self.params[i] for i in idx], self.views[idx], self.scored[idx])

    def slice(self, lo: int, n: int) -> "ViewBatch":
        return ViewBatch(self.params[lo:lo + n], self.views[lo:lo + n], self.scored[lo:lo + n])

    @classmethod
    def scatter(cls, drawn: "ViewBatch", at: list[int], n: int) -> "ViewBatch":
        """`drawn`'s rows placed at rows `at` of n (the others empty: rows in error, which no teacher reads)."""
        views = drawn.views.new_zeros((n, *drawn.views.shape[1:]))
        scored = drawn.scored.new_zeros((n, *drawn.scored.shape[1:]))
        views[at], scored[at] = drawn.views, drawn.scored
        params = [None] * n
        for i, p in zip(at, drawn.params):
            params[i] = p
        return cls(params, views, scored)

    def view_floats(self) -> torch.Tensor:
        """(n * k, 3, 224, 224) in [0, 1], as ToTensor gives them."""
        return self.views.flatten(0, 1).float().div(255)


class ViewDrawer:
    """Decodes originals and draws their views and the scorer's input: the teachers' per-image CPU work, free of
    models, so it can run where the rows are decoded (the in-process pipeline's DataLoader workers)."""

    def __init__(self, views: int, seed: int, preprocess: Callable, max_image_pixels: int):
        self.views, self.seed, self.preprocess, self.max_image_pixels = views, seed, preprocess, max_image_pixels

    def __call__(self, images: list[bytes], keys: list[str]) -> ViewBatch:
        params, views, scored = [], [], []
        for blob, key in zip(images, keys):
            img = decode_rgb(blob, self.max_image_pixels)
            p, v = draw_views(img, self.views, row_seed(self.seed, key, "views"), uint8=True)
            params.append(p)
            views.append(v)
            scored.append(self.preprocess(img))
        return ViewBatch(params, torch.stack(views), torch.stack(scored))


def teacher_input(views: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """(k, 3, 224, 224) views in [0, 1] -> a teacher's input: resized to its side (bicubic, antialiased) where it
    differs, then normalised with its mean / std."""
    if views.shape[-1] != size:
        views = F.resize(views, [size, size], InterpolationMode.BICUBIC, antialias=True)
    return F.normalize(views, list(mean), list(std))
