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


def draw_views(img: Image.Image, k: int, seed: int) -> tuple[list, torch.Tensor]:
    """k views of one image from `seed` (the global RNG is restored afterwards): (params, (k, 3, 224, 224))."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        drawn = [draw_view(img) for _ in range(k)]
    return [p for p, _ in drawn], torch.stack([v for _, v in drawn])


@dataclass
class ViewBatch:
    """The teachers' inputs of a run of rows, made on the CPU before any model runs: each row's views' `param_aug`
    entries, each teacher's input of its views (a list over teachers of (n, k, 3, side, side): resized to the
    teacher's side and normalised, `teacher_input`), and the scorer's eval-transform input (n, 3, S, S): as bytes
    with the `Normalize` still to apply (`scorer_norm`), or as the transform's floats when it ends otherwise."""
    params: list
    inputs: list[torch.Tensor]
    scored: torch.Tensor
    scorer_norm: Callable | None = None

    def _with(self, params: list, pick) -> "ViewBatch":
        return ViewBatch(params, [pick(x) for x in self.inputs], pick(self.scored), self.scorer_norm)

    def take(self, idx: list[int]) -> "ViewBatch":
        if idx == list(range(len(self.params))):
            return self
        return self._with([self.params[i] for i in idx], lambda x: x[idx])

    def slice(self, lo: int, n: int) -> "ViewBatch":
        return self._with(self.params[lo:lo + n], lambda x: x[lo:lo + n])

    @classmethod
    def scatter(cls, drawn: "ViewBatch", at: list[int], n: int) -> "ViewBatch":
        """`drawn`'s rows placed at rows `at` of n (the others empty: rows in error, which no teacher reads)."""
        def place(x: torch.Tensor) -> torch.Tensor:
            if len(at) == n:
                return x
            full = x.new_zeros((n, *x.shape[1:]))
            full[at] = x
            return full
        params = [None] * n
        for i, p in zip(at, drawn.params):
            params[i] = p
        return cls(params, [place(x) for x in drawn.inputs], place(drawn.scored), drawn.scorer_norm)

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


@dataclass(frozen=True)
class TeacherSide:
    """What a teacher's input needs from a view: its side, mean and std."""
    size: int
    mean: tuple
    std: tuple


class ViewDrawer:
    """Decodes originals, draws their views and makes each teacher's input of them and the scorer's input: the
    teachers' per-image CPU work, free of models, one image at a time (small tensors), so it can run where the rows
    are decoded (the in-process pipeline's DataLoader workers)."""

    def __init__(self, views: int, seed: int, sides: list[TeacherSide], preprocess: Callable, max_image_pixels: int):
        self.views, self.seed, self.sides, self.max_image_pixels = views, seed, sides, max_image_pixels
        self.preprocess, self.scorer_norm = split_at_to_tensor(preprocess)

    def __call__(self, images: list[bytes], keys: list[str]) -> ViewBatch:
        params, inputs, scored = [], [[] for _ in self.sides], []
        for blob, key in zip(images, keys):
            img = decode_rgb(blob, self.max_image_pixels)
            p, v = draw_views(img, self.views, row_seed(self.seed, key, "views"))
            params.append(p)
            for made, side in zip(inputs, self.sides):
                made.append(teacher_input(v, side.size, side.mean, side.std))
            scored.append(self.preprocess(img))
        return ViewBatch(params, [torch.stack(x) for x in inputs], torch.stack(scored), self.scorer_norm)


def teacher_input(views: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """(k, 3, 224, 224) views in [0, 1] -> a teacher's input: resized to its side (bicubic, antialiased) where it
    differs, then normalised with its mean / std."""
    if views.shape[-1] != size:
        views = F.resize(views, [size, size], InterpolationMode.BICUBIC, antialias=True)
    return F.normalize(views, list(mean), list(std))
