"""The one module that reaches into open_clip (pinned `open_clip_torch>=3.3,<3.4`); nothing else in clipdense does.

A new open_clip minor is adopted on purpose: bump the pin, run tests/test_models_adapter.py, and fix what it flags
here. Public API is used where it fits (`create_model`, `get_model_config`, `list_models`, `CoCa.forward`,
`VisionTransformer.forward_intermediates` / `prune_intermediate_layers` / `no_weight_decay`,
`Transformer.forward_intermediates`). Private names and module internals used, and why:

- `open_clip.factory._MODEL_CONFIGS` (`register_model_config`): our configs/models/*.json name a shipped BPE file
  relative to the JSON; the public `add_model_config` registers files as they are, so the resolved dict goes here.
- CoCa's `text_decoder.text_projection` (`init_unset_parameters`): open_clip 3.3 leaves it `torch.empty` in a
  randomly initialised CoCa (it never calls the decoder's broken `init_parameters`).
- CoCa's `text_decoder.ln_final` (`last_position_logits`): a pre-hook trims its input to the last position so the
  full forward projects one token per row to the vocabulary.
- `VisionTransformer.{conv1, class_embedding, positional_embedding, grid_size, patch_size, ln_pre}`
  (`vit_block_maps` at a grid other than the table's, `interpolated_pos_embed`): `_embeds`, which
  `forward_intermediates` runs, adds the stored table without interpolation, so inputs of another size (512 px crops,
  whole-image evaluation) are embedded here with a bicubically resized table, then run through the public
  `transformer.forward_intermediates`.
- `VisionTransformer.{attn_pool, attn_pool_contrastive, patch_dropout}` (`prune_vit`): `prune_intermediate_layers`
  keeps a CoCa tower's attention poolers (parameters without gradients, which DDP rejects); patch dropout is a
  CLIP-pretraining trick that would drop tokens from the dense maps.
- `ResidualAttentionBlock.{ls_1, ls_2}` (`add_vit_drop_path`): open_clip blocks have no drop path, so each residual
  branch's LayerScale is followed by a timm DropPath.
- Parameter names `conv1`, `class_embedding`, `positional_embedding`, `ln_pre`, `transformer.resblocks.<i>.`
  (`vit_layer_id`): layer-wise lr decay groups a ViT's parameters by block.
- `TimmModel.trunk` (`timm_trunk`): MobileCLIP's MCi (and other timm towers) are used as timm models.
- `TextTransformer.{transformer.resblocks, token_embedding, positional_embedding, cls_emb, pad_id, correct_cls_mask}`,
  `MultimodalTransformer.{resblocks, cross_attn, ln_final, text_projection}`, `ResidualAttentionBlock.{ln_1,
  ln_1_kv, ln_2, mlp, ls_1, ls_2}` and `nn.MultiheadAttention.in_proj_weight/in_proj_bias` slices (`CocaTowers`,
  `self_attn_qkv`, `cross_attn_q`, `cross_attn_kv`, `attn_residual`): the key/value-cached CoCa decoder
  (recaption/engines/kv_cache.py) runs open_clip's blocks one token at a time, so it needs their weights.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import open_clip
import torch
import torch.nn.functional as F
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer
from torch import nn

PINNED = "open_clip_torch>=3.3,<3.4"


# ---- model configs and creation ----

def register_model_config(name: str, cfg: dict) -> None:
    """Make `name` known to `open_clip.create_model`, `get_model_config`, `get_tokenizer` and `list_models`."""
    open_clip.factory._MODEL_CONFIGS[name] = cfg


def init_unset_parameters(model: nn.Module) -> None:
    """Initialise what open_clip 3.3 leaves `torch.empty` in a random model: a CoCa's vocabulary projection holds
    whatever memory it got (zeros in a fresh process, 1e35 or NaN in a long-lived one); init as open_clip intends."""
    proj = getattr(getattr(model, "text_decoder", None), "text_projection", None)
    if isinstance(proj, nn.Parameter):
        with torch.no_grad():
            nn.init.normal_(proj, std=model.text_decoder.width ** -0.5)


def vocab_projection(model: nn.Module) -> nn.Parameter:
    """A CoCa's decoder vocabulary projection [width, vocab] (tests and benches reshape its distribution)."""
    return model.text_decoder.text_projection


# ---- image towers ----

def preprocess_cfg(model: nn.Module) -> dict:
    """The image size / mean / std open_clip records on a model it created (or on its image tower)."""
    return dict(open_clip.get_model_preprocess_cfg(model) or {})


def is_vit(visual: nn.Module) -> bool:
    """Whether an image tower is open_clip's own VisionTransformer (as opposed to a timm or other tower)."""
    return isinstance(visual, VisionTransformer)


def timm_trunk(visual: nn.Module) -> nn.Module | None:
    """The timm model inside an open_clip timm tower (e.g. MobileCLIP's MCi), else None."""
    return visual.trunk if isinstance(visual, TimmModel) else None


@dataclass(frozen=True)
class VitShape:
    depth: int
    width: int
    patch: tuple[int, int]
    grid: tuple[int, int]  # the grid the stored position table covers


def vit_shape(vit: nn.Module) -> VitShape:
    return VitShape(len(vit.transformer.resblocks), vit.conv1.out_channels, tuple(vit.patch_size), tuple(vit.grid_size))


def prune_vit(vit: nn.Module, indices: list[int]) -> None:
    """Keep only what `vit_block_maps(vit, x, indices)` runs: blocks up to max(indices), no final norm, projection,
    poolers or patch dropout. Unused parameters would get no gradients (DDP rejects those)."""
    vit.prune_intermediate_layers(sorted(set(indices)), prune_norm=True, prune_head=True)
    vit.attn_pool = vit.attn_pool_contrastive = None
    vit.patch_dropout = nn.Identity()


def add_vit_drop_path(vit: nn.Module, rate: float, depth: int | None = None) -> None:
    """Stochastic depth on every block's two residual branches, rising linearly from 0 at block 0 to `rate` at block
    `depth - 1` (timm's rule; `depth` is the unpruned depth, so pruning keeps each block's rate)."""
    from timm.layers import DropPath

    blocks = vit.transformer.resblocks
    depth = depth or len(blocks)
    for i, blk in enumerate(blocks):
        r = rate * i / max(depth - 1, 1)
        blk.ls_1 = nn.Sequential(blk.ls_1, DropPath(r).train(blk.training))
        blk.ls_2 = nn.Sequential(blk.ls_2, DropPath(r).train(blk.training))


def interpolated_pos_embed(vit: nn.Module, grid: tuple[int, int]) -> torch.Tensor:
    """The position table for a `grid` of patches: the stored one at its own grid, else its patch part resized
    bicubically (the class token's entry unchanged)."""
    pos = vit.positional_embedding
    g0 = tuple(vit.grid_size)
    if tuple(grid) == g0:
        return pos
    table = pos[1:].reshape(1, g0[0], g0[1], -1).permute(0, 3, 1, 2).float()
    table = F.interpolate(table, size=tuple(grid), mode="bicubic", align_corners=False).to(pos.dtype)
    return torch.cat([pos[:1], table.flatten(2).transpose(1, 2)[0]], dim=0)


def _embed_any_size(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`VisionTransformer._embeds` with the position table resized to the input's grid (no patch dropout)."""
    x = vit.conv1(x)
    grid = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)
    cls = vit.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + interpolated_pos_embed(vit, grid).to(x.dtype)
    return vit.ln_pre(x)


def vit_block_maps(vit: nn.Module, x: torch.Tensor, indices: list[int]) -> list[torch.Tensor]:
    """Patch tokens after each block in `indices` (repeats allowed) as [B, width, H/patch, W/patch] maps."""
    take = sorted(set(indices))
    b, _, h, w = x.shape
    ph, pw = vit.patch_size
    grid = (h // ph, w // pw)
    if grid == tuple(vit.grid_size):
        maps = vit.forward_intermediates(x, indices=take, stop_early=True, intermediates_only=True)
        maps = maps["image_intermediates"]
    else:  # open_clip would add the stored table as is: embed here, then its own block loop
        _, tokens = vit.transformer.forward_intermediates(_embed_any_size(vit, x), indices=take, stop_early=True)
        maps = [t[:, 1:].transpose(1, 2).reshape(b, -1, *grid) for t in tokens]
    by_index = dict(zip(take, maps))
    return [by_index[i] for i in indices]


def vit_layer_id(name: str) -> int | None:
    """Layer-decay id of a ViT parameter (`name` relative to the tower): 0 for the patch/class/position embedding
    and pre-norm, i + 1 for block i, None for anything else."""
    if name.startswith(("conv1.", "class_embedding", "positional_embedding", "ln_pre.")):
        return 0
    parts = name.split(".")
    if parts[:2] == ["transformer", "resblocks"] and len(parts) > 3 and parts[2].isdigit():
        return int(parts[2]) + 1
    return None


# ---- CoCa ----

def is_coca(model: nn.Module) -> bool:
    return isinstance(model, open_clip.CoCa)


def coca_encode_image(model: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised image latent [B, D], image token embeddings [B, N, W]) as CoCa's own forward computes them."""
    out = model(pixels)
    return out["image_features"], out["image_embs"]


def coca_logits(model: nn.Module, prefix: torch.Tensor, latent: torch.Tensor, embs: torch.Tensor) -> torch.Tensor:
    """CoCa's full forward over caption prefixes with precomputed image outputs: logits [B, L, vocab]."""
    return model(None, prefix, image_latent=latent, image_embs=embs, output_labels=False)["logits"]


@contextlib.contextmanager
def last_position_logits(model: nn.Module):
    """Within: `coca_logits` projects only the last position (its final LayerNorm and projection are per-token,
    so trimming their input keeps the forward's values and saves a [B, L, vocab] matmul)."""
    hook = model.text_decoder.ln_final.register_forward_pre_hook(lambda _m, args: (args[0][:, -1:],))
    try:
        yield
    finally:
        hook.remove()


@dataclass
class CocaTowers:
    """A CoCa's text tower and multimodal decoder as the per-token parts an incremental decoder runs."""

    text_blocks: list[nn.Module]
    decoder_blocks: list[nn.Module]
    cross_blocks: list[nn.Module]
    pad_id: int
    correct_cls_mask: bool  # False: open_clip's legacy CoCa mask, shifted by one position
    embed: Callable[[torch.Tensor, int], torch.Tensor]  # (tokens [B, 1], position) -> [B, 1, width]
    head: Callable[[torch.Tensor], torch.Tensor]  # decoder output [B, 1, width] -> logits [B, 1, vocab]


def coca_towers(model: nn.Module) -> CocaTowers | None:
    """The parts of an open_clip CoCa whose text tower and decoder are the stock modules (batch-first
    ResidualAttentionBlocks, a CLS token); None for anything else (e.g. a Hugging Face text tower)."""
    from open_clip.transformer import MultimodalTransformer, ResidualAttentionBlock, TextTransformer

    text, dec = getattr(model, "text", None), getattr(model, "text_decoder", None)
    if not isinstance(text, TextTransformer) or not isinstance(dec, MultimodalTransformer):
        return None
    blocks = list(text.transformer.resblocks) + list(dec.resblocks) + list(dec.cross_attn)
    if not (text.cls_emb is not None and text.transformer.batch_first and dec.batch_first
            and all(type(b) is ResidualAttentionBlock and b.attn.batch_first for b in blocks)):
        return None

    def embed(tokens: torch.Tensor, pos: int) -> torch.Tensor:
        cast = text.transformer.get_cast_dtype()
        return text.token_embedding(tokens).to(cast) + text.positional_embedding[pos].to(cast)

    def head(x: torch.Tensor) -> torch.Tensor:
        x = dec.ln_final(x)
        return x @ dec.text_projection if dec.text_projection is not None else x

    return CocaTowers(list(text.transformer.resblocks), list(dec.resblocks), list(dec.cross_attn),
                      int(text.pad_id), bool(text.correct_cls_mask), embed, head)


def attn_heads(block: nn.Module) -> int:
    return block.attn.num_heads


def self_attn_qkv(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys, values [B, N, width] of a block's self-attention over its pre-normed input."""
    attn = block.attn
    return F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)


def cross_attn_q(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    attn, d = block.attn, x.shape[-1]
    return F.linear(block.ln_1(x), attn.in_proj_weight[:d], attn.in_proj_bias[:d])


def cross_attn_kv(block: nn.Module, image_embs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [B, N, width] of a cross-attention block over the image embeddings (its `ln_1_kv` applied)."""
    attn, d = block.attn, image_embs.shape[-1]
    kv = block.ln_1_kv(image_embs)
    w, b = attn.in_proj_weight, attn.in_proj_bias
    return F.linear(kv, w[d:2 * d], b[d:2 * d]), F.linear(kv, w[2 * d:], b[2 * d:])


def attn_residual(block: nn.Module, x: torch.Tensor, heads_out: torch.Tensor) -> torch.Tensor:
    """The rest of the block after attention: output projection of the merged heads [B, N, width], the residual,
    then the MLP branch."""
    attn = block.attn
    x = x + block.ls_1(F.linear(heads_out, attn.out_proj.weight, attn.out_proj.bias))
    return x + block.ls_2(block.mlp(block.ln_2(x)))
