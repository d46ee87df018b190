"""Caption policies: which text(s) a sample trains with. Small pure functions of (policy, captions, rng).

- real:      the web caption; a row without one is skipped (`no_caption`).
- synthetic: one of the N synthetic captions, drawn uniformly.
- mix:       synthetic with probability p, else real; a row without a real caption always takes a synthetic one.
- both:      DataCompDR: one real and one random synthetic caption; the loss is
             contrastive(image, real) + contrastive(image, synthetic) (apple/ml-mobileclip training/open_clip.patch).
             A row without a real caption trains the synthetic term only (`real_mask`: its real term is masked).
Images without alt text are recaptioned like any other: only `real` needs the web caption.

`captions.min_score` (synthetic, mix, both): a synthetic caption whose CLIP score (the recaption stage's `syn_scores`)
is below it is never drawn. The filter works on indices into the stored list, which stays whole, so a picked
caption keeps its teacher text embedding (text_emb row 1 + its index). A row left without one: `mix` trains its real
caption, the others skip it (`below_min_score`); a row without a real caption as well is skipped under `mix` too.

Randomness is a pure function of (seed, epoch, sample key) through `sample_rng`, never of global RNG state, so a
resumed run draws exactly what an uninterrupted one would have.
"""
from __future__ import annotations

import hashlib

import numpy as np

POLICIES = ("real", "synthetic", "mix", "both")


def captions_per_sample(policy: str) -> int:
    return 2 if policy == "both" else 1


def key_hash(key: str) -> int:
    """A stable 64-bit hash of a sample key (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def sample_rng(seed: int, epoch: int, key: str, stream: int = 0) -> np.random.Generator:
    """The generator for one sample in one epoch; `stream` separates uses (captions vs augmentation)."""
    return np.random.default_rng([seed, epoch, key_hash(key), stream])


def _usable(texts) -> list[str]:
    return [t for t in (texts or []) if t and str(t).strip()]


def kept_synthetic(syn, scores=None, min_score: float | None = None) -> list[int]:
    """Indices (into the stored `syn`) of the synthetic captions a sample may draw: the non-empty ones, scoring at
    least `min_score` when it is set (`scores[j]` is caption j's; the join checks they exist)."""
    idx = [j for j, t in enumerate(syn or []) if t and str(t).strip()]
    if min_score is None:
        return idx
    return [j for j in idx if scores[j] is not None and scores[j] >= min_score]


def has_text(real: str | None) -> bool:
    return bool(real and str(real).strip())


def missing_for(policy: str, real: str | None, syn, scores=None, min_score: float | None = None) -> str | None:
    """Why a row cannot train under `policy` (a row-error code, data/rows.py), or None."""
    has_real, has_syn = has_text(real), bool(_usable(syn))
    if policy == "real" and not has_real:
        return "no_caption"
    if policy in ("synthetic", "mix", "both") and not has_syn:
        return "no_synthetic_captions"
    if policy != "real" and min_score is not None and not kept_synthetic(syn, scores, min_score) \
            and (policy != "mix" or not has_real):
        return "below_min_score"
    return None


def pick_captions(policy: str, real: str | None, syn, rng: np.random.Generator, mix_p: float = 0.5,
                  scores=None, min_score: float | None = None) -> list[str]:
    """The caption(s) one sample trains with: [text] or, for `both`, [real, synthetic]; synthetic ones only among
    those scoring at least `min_score` (`kept_synthetic`)."""
    if policy == "real":
        return [real]
    syn = [syn[j] for j in kept_synthetic(syn, scores, min_score)]
    if policy == "synthetic":
        return [syn[int(rng.integers(len(syn)))]]
    if policy == "mix":
        use_syn = rng.random() < mix_p
        if not syn:  # every synthetic caption below captions.min_score: the real one (the join ensured it exists)
            return [real]
        j = int(rng.integers(len(syn)))  # drawn either way: the stream does not depend on the coin
        return [syn[j] if use_syn or not has_text(real) else real]
    if policy == "both":  # no real caption: an empty placeholder, masked out of the loss (real_mask)
        return [real if has_text(real) else "", syn[int(rng.integers(len(syn)))]]
    raise ValueError(f"unknown caption policy {policy!r} (choose from {', '.join(POLICIES)})")


def pick_batch(policy: str, keys, reals, syns, seed: int, epoch: int, mix_p: float = 0.5, scores=None,
               min_score: float | None = None) -> list[list[str]]:
    """Per caption slot, the batch's texts: [[texts for slot 0], ([texts for slot 1])]; `scores`: each row's
    `syn_scores` (needed with `min_score`)."""
    if policy == "real":  # no draw: the generator would cost more than the rest of the pick
        return [list(reals)]
    scores = scores if scores is not None else [None] * len(keys)
    picked = [pick_captions(policy, r, s, sample_rng(seed, epoch, k, 1), mix_p, sc, min_score)
              for k, r, s, sc in zip(keys, reals, syns, scores)]
    return [list(col) for col in zip(*picked)] if picked else [[] for _ in range(captions_per_sample(policy))]


def real_mask(reals) -> list[bool]:
    """`both`: which rows have a real caption (the others train the synthetic term only)."""
    return [has_text(r) for r in reals]
