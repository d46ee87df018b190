"""Batched top-p sampling of token sequences, the way open_clip's `CoCa.generate(generation_type="top_p")` does it,
without its `transformers` dependency (open_clip 3.3 imports TopPLogitsWarper & co from transformers; see
REFERENCE.md: that transformers pin conflicts with vLLM's).

Semantics kept from open_clip: sequences start with <start_of_text>; no <end_of_text> while the prefix is shorter
than `min_seq_len` (HF MinLengthLogitsProcessor); top-p filtering as HF's TopPLogitsWarper (min_tokens_to_keep=1)
then softmax(filtered / temperature); the token at position seq_len - 1 is forced to <end_of_text>, so every
sequence has at most `seq_len` tokens ("fixed output length"); finished sequences are padded.
Differences (same distribution, less work): only unfinished sequences are run through the model at each step
(open_clip runs all of them); the nucleus is found in a top-k candidate list when those k tokens already hold
top_p of the mass (else a full sort), and the token is drawn by inverse-CDF on the sorted nucleus instead of
torch.multinomial over the whole vocabulary (both dominated CPU time). Token 0 (open_clip's pad id, "!" in the
CLIP vocabulary) is an ordinary token here, not a stop.

Randomness is per sequence, not per batch: `sequence_uniforms(seed, keys, n, seq_len)` gives caption j of the row
with key k its own uniforms (a CPU generator seeded from a hash of (seed, k, j)), one per position, so a caption is
a pure function of (engine seed, row key, image) whatever the batch, actor count or order.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from clipdense.recaption.engines.seeds import row_seed

# next_logits(prefixes [A, L] long, rows [A] long indices into the batch) -> logits [A, vocab]
NextLogits = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most probable tokens whose mass reaches top_p (at least one); others -> -inf."""
    sorted_logits, sorted_idx = torch.sort(logits, descending=False, dim=-1)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cum <= (1 - top_p)
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def nucleus(logits: torch.Tensor, top_p: float, k: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted logits, their token ids, keep mask) per row, most probable first; `keep` is the top-p set exactly
    as top_p_filter keeps it: a token stays while the mass of the tokens before it is < top_p."""
    lse = logits.logsumexp(dim=-1, keepdim=True)
    vals = idx = None
    if logits.shape[-1] > k:
        vals, idx = logits.topk(k, dim=-1)  # sorted, descending
        if not bool(((vals - lse).exp().sum(-1) >= top_p).all()):
            vals = idx = None  # some nucleus reaches beyond the k candidates
    if vals is None:
        vals, idx = logits.sort(dim=-1, descending=True)
    probs = (vals - lse).exp()
    keep = (probs.cumsum(-1) - probs) < top_p
    keep[:, 0] = True
    width = int(keep.sum(-1).max())  # columns past the widest nucleus are never drawn
    return vals[:, :width], idx[:, :width], keep[:, :width]


def sequence_uniforms(seed: int, keys: Sequence[str], n: int, seq_len: int) -> torch.Tensor:
    """[len(keys) * n, seq_len] float32 uniforms on the CPU; row i*n + j = caption j of keys[i]."""
    rows = []
    for key in keys:
        for j in range(n):
            rows.append(torch.rand(seq_len, generator=torch.Generator().manual_seed(row_seed(seed, key, j))))
    return torch.stack(rows) if rows else torch.empty(0, seq_len)


def sample_nucleus(logits: torch.Tensor, top_p: float, temperature: float = 1.0,
                   generator: torch.Generator | None = None, uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row from softmax(top-p-filtered logits / temperature) (open_clip's order); `uniforms` [rows]
    (in [0, 1)) replace draws from `generator`."""
    vals, idx, keep = nucleus(logits, top_p)
    weights = ((vals - vals[:, :1]) / temperature).exp() * keep
    cdf = weights.cumsum(-1)
    if uniforms is None:
        uniforms = torch.rand((logits.shape[0],), generator=generator, device=logits.device, dtype=cdf.dtype)
    u = uniforms.to(cdf.device, cdf.dtype)[:, None] * cdf[:, -1:]
    pos = torch.searchsorted(cdf, u, right=True).clamp_(max=vals.shape[-1] - 1)
    return idx.gather(1, pos).squeeze(1)


@torch.no_grad()
def sample_top_p(next_logits: NextLogits, num_seqs: int, *, sot: int, eot: int, pad: int = 0, seq_len: int = 30,
                 min_seq_len: int = 5, top_p: float = 0.9, temperature: float = 1.0,
                 generator: torch.Generator | None = None, device: torch.device | str = "cpu",
                 uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """[num_seqs, seq_len] token ids: <sot> tokens... <eot> pad...; `uniforms` [num_seqs, seq_len] (see
    sequence_uniforms) make each sequence's draws its own, else `generator` draws for the batch."""
    if uniforms is not None:
        uniforms = uniforms.to(device)
    out = torch.full((num_seqs, seq_len), pad, dtype=torch.long, device=device)
    out[:, 0] = sot
    done = torch.zeros(num_seqs, dtype=torch.bool, device=device)
    for cur in range(1, seq_len):  # cur = prefix length = position of the next token
        rows = (~done).nonzero().squeeze(1)
        if rows.numel() == 0:
            break
        if cur == seq_len - 1:
            out[rows, cur] = eot
            break
        logits = next_logits(out[rows, :cur], rows).float()
        if cur < min_seq_len:
            logits[:, eot] = float("-inf")
        tokens = sample_nucleus(logits, top_p, temperature, generator,
                                None if uniforms is None else uniforms[rows, cur])
        out[rows, cur] = tokens
        done[rows] = tokens == eot
    return out


def decode_sequences(tokens: torch.Tensor, decode: Callable[[list[int]], str], sot: int, eot: int) -> list[str]:
    """Token rows -> text between <sot> and the first <eot> (DataCompDR splits the decoded text the same way)."""
    texts = []
    for row in tokens.tolist():
        if row and row[0] == sot:
            row = row[1:]
        if eot in row:
            row = row[: row.index(eot)]
        texts.append(decode(row))
    return texts
