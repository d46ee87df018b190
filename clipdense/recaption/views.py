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
import torchvision.transforms as T
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
    entries, the views as bytes (n, k, 3, 224, 224) and the scorer's eval-transform input (n, 3, S, S): as bytes
    with the `Normalize` still to apply (`scorer_norm`), or as the transform's floats when it ends otherwise."""
    params: list
    views: torch.Tensor
    scored: torch.Tensor
    scorer_norm: Callable | None = None

    def take(self, idx: list[int]) -> "ViewBatch":
        return ViewBatch([self.params[i] for i in idx], self.views[idx], self.scored[idx], self.scorer_norm)

    def slice(self, lo: int, n: int) -> "ViewBatch":
        return ViewBatch(self.params[lo:lo + n], self.views[lo:lo + n], self.scored[lo:lo + n], self.scorer_norm)

    @classmethod
    def scatter(cls, drawn: "ViewBatch", at: list[int], n: int) -> "ViewBatch":
        """`drawn`'s rows placed at rows `at` of n (the others empty: rows in error, which no teacher reads)."""
        views = drawn.views.new_zeros((n, *drawn.views.shape[1:]))
        scored = drawn.scored.new_zeros((n, *drawn.scored.shape[1:]))
        views[at], scored[at] = drawn.views, drawn.scored
        params = [None] * n
        for i, p in zip(at, drawn.params):
            params[i] = p
        return cls(params, views, scored, drawn.scorer_norm)

    def view_floats(self) -> torch.Tensor:
        """(n * k, 3, 224, 224) in [0, 1], as ToTensor gives them."""
        return self.views.flatten(0, 1).float().div(255)

    def scorer_input(self) -> torch.Tensor:
        """The scorer's eval transform of each row's image, as the transform itself gives it."""
        if self.scorer_norm is None:
            return self.scored
        return self.scorer_norm(self.scored.float().div(255))


def split_at_to_tensor(preprocess: Callable) -> tuple[Callable, Callable | None]:
    """An eval transform that ends in ToTensor + Normalize (open_clip's) as (its PIL steps then bytes, the
    Normalize): ToTensor is the bytes' `.float().div(255)`, so the two halves give its output bit for bit, and the
    half that crosses between processes is a quarter the size. Any other transform: (itself, None)."""
    steps = list(getattr(preprocess, "transforms", []))
    if len(steps) >= 2 and isinstance(steps[-2], T.ToTensor) and isinstance(steps[-1], T.Normalize):
        return T.Compose([*steps[:-2], F.pil_to_tensor]), steps[-1]
    return preprocess, None


class ViewDrawer:
    """Decodes originals and draws their views and the scorer's input: the teachers' per-image CPU work, free of
    models, so it can run where the rows are decoded (the in-process pipeline's DataLoader workers)."""

    def __init__(self, views: int, seed: int, preprocess: Callable, max_image_pixels: int):
        self.views, self.seed, self.max_image_pixels = views, seed, max_image_pixels
        self.preprocess, self.scorer_norm = split_at_to_tensor(preprocess)

    def __call__(self, images: list[bytes], keys: list[str]) -> ViewBatch:
        params, views, scored = [], [], []
        for blob, key in zip(images, keys):
            img = decode_rgb(blob, self.max_image_pixels)
            p, v = draw_views(img, self.views, row_seed(self.seed, key, "views"), uint8=True)
            params.append(p)
            views.append(v)
            scored.append(self.preprocess(img))
        return ViewBatch(params, torch.stack(views), torch.stack(scored), self.scorer_norm)


def teacher_input(views: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """(k, 3, 224, 224) views in [0, 1] -> a teacher's input: resized to its side (bicubic, antialiased) where it
    differs, then normalised with its mean / std."""
    if views.shape[-1] != size:
        views = F.resize(views, [size, size], InterpolationMode.BICUBIC, antialias=True)
    return F.normalize(views, list(mean), list(std))
