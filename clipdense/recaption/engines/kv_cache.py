"""Incremental CoCa decoding with key/value caches over open_clip's own modules
(reached through clipdense.models.open_clip_adapter).

open_clip's CoCa re-runs the text tower and the multimodal decoder over the whole prefix for every new token
(O(L^2) token passes per caption). Both towers are causal over the caption tokens (the CLS token is appended
last, so no caption token sees it), so the hidden states of earlier positions never change: caching each
self-attention's keys/values and the cross-attention's image keys/values makes each step one token per sequence.
Logits equal open_clip's forward (tested to fp32 tolerance), including its text-tower rule that masks keys at pad ids
(shifted by one position in open_clip's default legacy CLS mode, as open_clip does).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from clipdense.models import open_clip_adapter as oca


def supports_kv_cache(model) -> bool:
    """Whether `model` is an open_clip CoCa with the built-in text tower and decoder this module re-implements."""
    return oca.coca_towers(model) is not None


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = x.shape
    return x.view(b, n, heads, d // heads).transpose(1, 2)  # [B, H, N, hd]


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, hd = x.shape
    return x.transpose(1, 2).reshape(b, n, h * hd)


class _SelfAttnCache:
    """Keys/values of one causal self-attention block, for every position fed so far."""

    def __init__(self, block, rows: int, max_len: int):
        self.block, self.heads, self.max_len = block, oca.attn_heads(block), max_len
        self.k = self.v = None
        self.rows = rows

    def step(self, x: torch.Tensor, pos: int, key_ok: torch.Tensor | None) -> torch.Tensor:
        q, k, v = (_split_heads(t, self.heads) for t in oca.self_attn_qkv(self.block, x))
        if self.k is None:  # allocate on first use, in the dtype autocast produced
            shape = (self.rows, self.heads, self.max_len, k.shape[-1])
            self.k, self.v = k.new_empty(shape), v.new_empty(shape)
        self.k[:, :, pos:pos + 1], self.v[:, :, pos:pos + 1] = k, v
        mask = None if key_ok is None else key_ok[:, None, None, :pos + 1]
        out = F.scaled_dot_product_attention(q, self.k[:, :, :pos + 1], self.v[:, :, :pos + 1], attn_mask=mask)
        return oca.attn_residual(self.block, x, _merge_heads(out))

    def keep(self, idx: torch.Tensor) -> None:
        if self.k is not None:
            self.k, self.v = self.k[idx], self.v[idx]


class _CrossAttn:
    """One cross-attention block with the image's keys/values projected once."""

    def __init__(self, block, image_embs: torch.Tensor):
        self.block, self.heads = block, oca.attn_heads(block)
        self.k, self.v = (_split_heads(t, self.heads) for t in oca.cross_attn_kv(block, image_embs))

    def step(self, x: torch.Tensor) -> torch.Tensor:
        q = _split_heads(oca.cross_attn_q(self.block, x), self.heads)
        out = F.scaled_dot_product_attention(q, self.k, self.v)
        return oca.attn_residual(self.block, x, _merge_heads(out))

    def keep(self, idx: torch.Tensor) -> None:
        self.k, self.v = self.k[idx], self.v[idx]


class CocaKVDecoder:
    """`next_logits(prefixes, rows)` for sample_top_p, one new token per call.

    Call with prefixes of length 1, 2, 3, ... in order; `rows` (indices into the batch of `image_embs`) may only
    shrink, as sample_top_p drops finished sequences; the caches are compacted to match.
    """

    def __init__(self, model, image_embs: torch.Tensor, max_len: int):
        towers = oca.coca_towers(model)
        if towers is None:
            raise ValueError(f"{type(model).__name__}: not an open_clip CoCa with the stock text tower and decoder")
        self.towers, self.pad = towers, towers.pad_id
        n = image_embs.shape[0]
        self.text_blocks = [_SelfAttnCache(b, n, max_len) for b in towers.text_blocks]
        self.dec_blocks = [_SelfAttnCache(b, n, max_len) for b in towers.decoder_blocks]
        self.cross = [_CrossAttn(b, image_embs) for b in towers.cross_blocks]
        self.key_ok = torch.ones(n, max_len, dtype=torch.bool, device=image_embs.device)
        self.rows = torch.arange(n, device=image_embs.device)
        self.pos = 0

    def _keep(self, rows: torch.Tensor) -> None:
        if rows.shape == self.rows.shape and bool((rows == self.rows).all()):
            return
        idx = torch.searchsorted(self.rows, rows)  # both sorted; rows is a subset of self.rows
        for c in (*self.text_blocks, *self.dec_blocks, *self.cross):
            c.keep(idx)
        self.key_ok, self.rows = self.key_ok[idx], rows

    @torch.no_grad()
    def __call__(self, prefixes: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if prefixes.shape[1] != self.pos + 1:
            raise ValueError(f"expected a prefix of length {self.pos + 1}, got {prefixes.shape[1]}")
        self._keep(rows)
        pos, tok = self.pos, prefixes[:, -1:]
        if self.towers.correct_cls_mask:
            self.key_ok[:, pos] = tok[:, 0] != self.pad
        elif pos > 0:  # open_clip's legacy CoCa mask (its default) is shifted by one: key j is masked for pad at j-1
            self.key_ok[:, pos] = prefixes[:, -2] != self.pad
        x = self.towers.embed(tok, pos)
        for c in self.text_blocks:
            x = c.step(x, pos, self.key_ok)
        for c, cross in zip(self.dec_blocks, self.cross):
            x = cross.step(c.step(x, pos, None))
        self.pos += 1
        return self.towers.head(x)[:, -1]
