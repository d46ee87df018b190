"""The open_clip adapter against open_clip's own forwards: what a new open_clip version could break shows up here."""
from __future__ import annotations

import copy
import gzip
import re
from importlib.metadata import version
from pathlib import Path

import open_clip
import pytest
import torch
from packaging.specifiers import SpecifierSet
from torch import nn

from clipdense.models import create_clip, register_model_configs, tokenizer_for
from clipdense.models import open_clip_adapter as oca

REPO = Path(__file__).resolve().parents[1]


def test_installed_open_clip_is_the_pinned_minor():
    pins = re.findall(r'"(open_clip_torch[^"]*)"', (REPO / "pyproject.toml").read_text())
    assert pins == [oca.PINNED]
    assert version("open_clip_torch") in SpecifierSet(oca.PINNED.removeprefix("open_clip_torch"))


def test_model_configs_registered_with_resolved_bpe():
    names = register_model_configs()
    assert {"clip-tiny", "coca-tiny", "clip-demo", "coca-demo"} <= set(names) <= set(open_clip.list_models())
    bpe = open_clip.get_model_config("clip-demo")["text_cfg"]["tokenizer_kwargs"]["bpe_path"]
    merges = len(gzip.open(bpe, "rt").read().splitlines()) - 1  # open_clip skips the header line
    tok = tokenizer_for("clip-demo")
    assert merges == 8000 and len(tok.encoder) == 256 * 2 + 8000 + 2  # bytes, byte</w>, merges, sot/eot
    assert open_clip.create_model("clip-tiny").visual.image_size == (64, 64)


def test_random_coca_vocab_projection_is_initialised():
    proj = oca.vocab_projection(create_clip("coca-tiny"))
    assert torch.isfinite(proj).all() and 0.5 < float(proj.detach().std()) * 64 ** 0.5 < 2.0


@pytest.fixture()
def vit():
    torch.manual_seed(0)
    return create_clip("clip-tiny").visual.eval()


def test_vit_block_maps_equal_open_clip_forward(vit):
    """Unpruned open_clip: forward_intermediates' blocks and its own forward's final tokens; pruned adapter: equal."""
    x = torch.randn(2, 3, 64, 64)
    ref = vit.forward_intermediates(x, indices=[0, 1], intermediates_only=True)["image_intermediates"]
    vit.output_tokens = True
    _, tokens = vit(x)  # ln_post(last block)[:, 1:]
    ln_post = copy.deepcopy(vit.ln_post)
    pruned = copy.deepcopy(vit)
    oca.prune_vit(pruned, [1, 0, 1, 0])
    maps = oca.vit_block_maps(pruned, x, [1, 0, 1, 0])
    assert [m.shape for m in maps] == [(2, 64, 8, 8)] * 4
    assert torch.equal(maps[0], ref[1]) and torch.equal(maps[1], ref[0]) and maps[2] is maps[0]
    assert torch.allclose(ln_post(maps[0].flatten(2).transpose(1, 2)), tokens, atol=1e-6)
    assert pruned.proj is None and pruned.attn_pool is None and len(pruned.transformer.resblocks) == 2


def test_interpolation_path_equals_open_clip(vit):
    """At the table's own grid the adapter's embedding is open_clip's `_embeds`; at another grid it equals open_clip
    run on a copy whose table was resized to that grid (what building the table at 512 px will do)."""
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(oca._embed_any_size(vit, x), vit._embeds(x))
    assert oca.interpolated_pos_embed(vit, (8, 8)) is vit.positional_embedding
    big = torch.randn(2, 3, 96, 128)
    resized = copy.deepcopy(vit)
    resized.positional_embedding = nn.Parameter(oca.interpolated_pos_embed(vit, (12, 16)).detach())
    resized.grid_size = (12, 16)
    ref = resized.forward_intermediates(big, indices=[0, 1], intermediates_only=True)["image_intermediates"]
    got = oca.vit_block_maps(vit, big, [0, 1])
    assert [g.shape for g in got] == [(2, 64, 12, 16)] * 2
    assert all(torch.allclose(g, r, atol=1e-6) for g, r in zip(got, ref))
    assert torch.equal(resized.positional_embedding[0], vit.positional_embedding[0])  # the class token's entry


def test_pruned_vit_trains_every_parameter(vit):
    oca.prune_vit(vit, [0, 0, 0, 0])
    assert len(vit.transformer.resblocks) == 1
    vit.train()
    for size in ((64, 64), (32, 48)):
        vit.zero_grad()
        sum(m.square().mean() for m in oca.vit_block_maps(vit, torch.randn(2, 3, *size), [0])).backward()
        assert all(p.grad is not None for p in vit.parameters())


def test_vit_drop_path_rates_and_layer_ids(vit):
    ids = {n: oca.vit_layer_id(n) for n, _ in vit.named_parameters()}
    assert {n for n, i in ids.items() if i is None} == {"ln_post.weight", "ln_post.bias", "proj"}
    assert {n for n, i in ids.items() if i == 0} == {"conv1.weight", "class_embedding", "positional_embedding",
                                                    "ln_pre.weight", "ln_pre.bias"}
    assert ids["transformer.resblocks.1.attn.in_proj_weight"] == 2
    assert vit.no_weight_decay() == {"positional_embedding", "class_embedding"}
    x = torch.randn(2, 3, 64, 64)
    before = oca.vit_block_maps(vit, x, [1])[0]
    oca.add_vit_drop_path(vit, 0.4, depth=5)
    rates = [[m.drop_prob for m in blk.modules() if type(m).__name__ == "DropPath"]
             for blk in vit.transformer.resblocks]
    assert rates == [[0.0, 0.0], [0.1, 0.1]]
    assert torch.equal(oca.vit_block_maps(vit, x, [1])[0], before)  # eval: drop path is the identity


def test_tower_kinds():
    assert oca.is_vit(create_clip("clip-tiny").visual) and oca.timm_trunk(create_clip("clip-tiny").visual) is None
    oca.register_model_config("timm-tower-test", {
        "embed_dim": 32, "vision_cfg": {"timm_model_name": "test_convnext", "timm_pool": "avg", "timm_proj": "linear",
                                        "image_size": 64},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}})
    visual = create_clip("timm-tower-test").visual
    trunk = oca.timm_trunk(visual)
    assert not oca.is_vit(visual) and trunk is not None and hasattr(trunk, "forward_intermediates")
    assert oca.preprocess_cfg(create_clip("clip-tiny"))["size"] == (64, 64)


@pytest.fixture(scope="module")
def coca():
    torch.manual_seed(0)
    model = create_clip("coca-tiny").eval()
    nn.init.normal_(oca.vocab_projection(model), std=2.0)
    return model


def test_coca_image_encoding_equals_open_clip(coca):
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        latent, embs = oca.coca_encode_image(coca, x)
        ref_latent, ref_embs = coca._encode_image(x)
        assert torch.equal(latent, ref_latent) and torch.equal(embs, ref_embs)
        assert torch.equal(latent, coca.encode_image(x)) and embs.shape[0] == 3


def test_coca_last_position_logits_equal_full_forward(coca):
    assert oca.is_coca(coca) and not oca.is_coca(create_clip("clip-tiny"))
    assert oca.coca_towers(coca) is not None and oca.coca_towers(create_clip("clip-tiny")) is None
    x = torch.randn(2, 3, 64, 64)
    prefix = torch.randint(1, 1000, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        latent, embs = oca.coca_encode_image(coca, x)
        full = oca.coca_logits(coca, prefix, latent, embs)
        ref = coca(x, prefix, output_labels=False)["logits"]
        with oca.last_position_logits(coca):
            last = oca.coca_logits(coca, prefix, latent, embs)
    assert full.shape == (2, 6, 49408) and torch.equal(full, ref)
    assert last.shape == (2, 1, 49408) and torch.allclose(last[:, 0], full[:, -1], atol=1e-5)
    assert not coca.text_decoder.ln_final._forward_pre_hooks  # the hook is removed


def test_kv_parts_rebuild_a_block(coca):
    """q/k/v slices + residual == the block's own forward (self-attention, causal over 5 tokens; cross-attention)."""
    torch.manual_seed(1)
    towers = oca.coca_towers(coca)
    blk, cross = towers.decoder_blocks[0], towers.cross_blocks[0]
    x, img = torch.randn(2, 5, 64), torch.randn(2, 7, 64)
    h = oca.attn_heads(blk)
    split = lambda t: t.view(2, -1, h, 64 // h).transpose(1, 2)  # noqa: E731
    merge = lambda t: t.transpose(1, 2).reshape(2, -1, 64)  # noqa: E731
    with torch.no_grad():
        q, k, v = (split(t) for t in oca.self_attn_qkv(blk, x))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        mask = torch.full((5, 5), float("-inf")).triu(1)
        assert torch.allclose(oca.attn_residual(blk, x, merge(out)), blk(x, attn_mask=mask), atol=1e-5)
        ck, cv = (split(t) for t in oca.cross_attn_kv(cross, img))
        out = torch.nn.functional.scaled_dot_product_attention(split(oca.cross_attn_q(cross, x)), ck, cv)
        assert torch.allclose(oca.attn_residual(cross, x, merge(out)), cross(x, k_x=img, v_x=img), atol=1e-5)


def test_every_private_use_is_in_the_adapter():
    """No other module names an open_clip private attribute or the packed in_proj weights."""
    root = REPO / "clipdense"
    pattern = re.compile(r"_MODEL_CONFIGS|\._encode_(image|text)\b|\._embeds\b|in_proj_|open_clip\.\w+\._")
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if p.name != "open_clip_adapter.py" and pattern.search(p.read_text())]
    assert offenders == []
