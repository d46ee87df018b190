"""The teachers' forward on one batch of rows: their k views drawn (views.py: decode the original, draw), embed every
view and every caption (the original + the synthetic ones) with each teacher. Embeddings are L2-normalised per
teacher and concatenated along the feature axis (DataCompDR's blocks, `loss.distill.teacher_dims`), stored float16.
Imports torch and open_clip: only the teacher actors (teachers.py) and tests load this module."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import open_clip
import torch

from clipdense.data.layouts import npz_bytes
from clipdense.models.registry import create_clip_and_transforms, tokenizer_for
from clipdense.recaption.config import TeacherModel, TeachersConfig
from clipdense.recaption.views import TeacherSide, ViewBatch, ViewDrawer

FOLDER_SCHEMAS = ("local-dir:", "hf-hub:")   # open_clip's own folder layout: config + weights + tokenizer


@dataclass
class Teacher:
    name: str
    model: torch.nn.Module
    tokenizer: object
    size: int           # input side
    mean: tuple
    std: tuple
    preprocess: object  # open_clip's eval transform (resize, centre crop, normalise): the view a score sees


def load_teacher(t: TeacherModel, device: str) -> Teacher:
    """An open_clip teacher by name (+ tag or checkpoint), or an open_clip folder (`local-dir:` / `hf-hub:`)."""
    if t.pretrained and t.pretrained.startswith(FOLDER_SCHEMAS):
        model, _, preprocess = open_clip.create_model_and_transforms(t.pretrained)
        tokenizer = open_clip.get_tokenizer(t.pretrained)
    else:
        model, _, preprocess = create_clip_and_transforms(t.name, pretrained=t.pretrained)
        tokenizer = tokenizer_for(t.name)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    mean = getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    return Teacher(t.name, model.to(device).eval(), tokenizer, int(size), tuple(mean), tuple(std), preprocess)


def pick_device(device: str) -> str:
    return "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"


def distinct_indices(texts: list[str]) -> list[int]:
    """The index of each distinct text's first occurrence, in order (duplicates dropped)."""
    first: dict[str, int] = {}
    for j, t in enumerate(texts):
        first.setdefault(t, j)
    return list(first.values())


@dataclass
class Reinforced:
    """One row's teacher outputs: the views' parameters (param_aug), the npz (image_emb, text_emb) and the CLIP
    score of each caption (the original's first: None when the row has none)."""
    param_aug: list
    npz: bytes
    scores: list[float | None]


class TeacherForward:
    """Every teacher loaded once; `rows` embeds a batch."""

    def __init__(self, cfg: TeachersConfig):
        self.cfg, self.device = cfg, pick_device(cfg.device)
        self.teachers = [load_teacher(t, self.device) for t in cfg.models]

    @torch.no_grad()
    def embed_images(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        """Each teacher's input of the same n views (`ViewBatch.inputs`, flattened to (n, 3, side, side)) ->
        (n, sum of teacher dims), each teacher's block unit-norm."""
        blocks = []
        for t, x in zip(self.teachers, inputs):
            out = []
            for s in range(0, len(x), self.cfg.batch_size):
                out.append(t.model.encode_image(x[s:s + self.cfg.batch_size].to(self.device),
                                                normalize=True).float().cpu())
            blocks.append(torch.cat(out))
        return torch.cat(blocks, 1)

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        blocks = []
        for t in self.teachers:
            out = []
            for s in range(0, len(texts), self.cfg.batch_size):
                tokens = t.tokenizer(texts[s:s + self.cfg.batch_size]).to(self.device)
                out.append(t.model.encode_text(tokens, normalize=True).float().cpu())
            blocks.append(torch.cat(out))
        self.dims = [b.shape[1] for b in blocks]  # each teacher's block of the concatenated embeddings
        return torch.cat(blocks, 1)

    def drawer(self, max_image_pixels: int) -> ViewDrawer:
        """The CPU side of `rows` (decode, views, the scorer's input), free of the models."""
        sides = [TeacherSide(t.size, t.mean, t.std) for t in self.teachers]
        return ViewDrawer(self.cfg.views, self.cfg.seed, sides, self.scorer.preprocess, max_image_pixels)

    def rows(self, drawn: ViewBatch, captions: list[str | None], syns: list[list[str]]) -> list[Reinforced]:
        """Each row's embeddings of its drawn views and captions; text_emb row 0 is the original caption (empty when
        none), then the synthetic captions in order (DataCompDR's order)."""
        k = self.cfg.views
        image_emb = self.embed_images([x.flatten(0, 1) for x in drawn.inputs]).numpy().astype(np.float16)
        texts = [[c or "", *s] for c, s in zip(captions, syns)]
        text_emb = self.embed_texts([t for ts in texts for t in ts])
        scores = self.scores(drawn.scorer_input(), text_emb, [len(ts) for ts in texts])
        text_emb = text_emb.numpy().astype(np.float16)
        out, j = [], 0
        for i, ts in enumerate(texts):
            npz = npz_bytes(image_emb=image_emb[i * k:(i + 1) * k], text_emb=text_emb[j:j + len(ts)])
            out.append(Reinforced(drawn.params[i], npz, [None if not captions[i] else scores[i][0], *scores[i][1:]]))
            j += len(ts)
        return out

    @torch.no_grad()
    def rerank(self, scored: torch.Tensor, candidates: list[list[str]], keep: int) -> list[list[int]]:
        """Per row, the indices of its `keep` best distinct candidates by the scorer's CLIP score (`scored`: the
        rows' images under its eval transform), best first; a row with fewer distinct ones repeats them in that
        order (every row keeps exactly `keep`)."""
        t = self.scorer
        img = t.model.encode_image(scored.to(self.device), normalize=True).float().cpu()
        distinct = [distinct_indices(cands) for cands in candidates]
        texts = [candidates[i][j] for i, idx in enumerate(distinct) for j in idx]
        emb = []
        for s in range(0, len(texts), self.cfg.batch_size):
            tokens = t.tokenizer(texts[s:s + self.cfg.batch_size]).to(self.device)
            emb.append(t.model.encode_text(tokens, normalize=True).float().cpu())
        emb = torch.cat(emb) if emb else torch.empty(0)
        out, start = [], 0
        for i, idx in enumerate(distinct):
            score = emb[start:start + len(idx)] @ img[i]
            start += len(idx)
            order = [idx[j] for j in torch.argsort(score, descending=True, stable=True).tolist()]
            out.append([order[m % len(order)] for m in range(keep)])
        return out

    @property
    def scorer(self) -> Teacher:
        return self.teachers[self.cfg.scorer_index]

    @torch.no_grad()
    def scores(self, images: torch.Tensor, text_emb: torch.Tensor, counts: list[int]) -> list[list[float]]:
        """Per row, the cosine of the scorer's image embedding (eval transform) and each of its captions' embeddings
        (the scorer's block of `text_emb`)."""
        idx, dims = self.cfg.scorer_index, self.dims
        block = text_emb[:, sum(dims[:idx]):sum(dims[:idx + 1])]
        x = images.to(self.device)
        img = self.scorer.model.encode_image(x, normalize=True).float().cpu()
        out, j = [], 0
        for i, n in enumerate(counts):
            out.append([float(v) for v in block[j:j + n] @ img[i]])
            j += n
        return out
