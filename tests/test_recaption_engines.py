"""Captioner engines without Ray: the top-p sampler, the CoCa engine (coca-tiny), echo, the CPU decode step, an
engine registered from outside the package."""
import io
import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from shard_files import jpeg_bytes

from clipdense.cli import main as cli_main
from clipdense.config import ConfigError, build_config
from clipdense.data.images import ImageError
from clipdense.recaption import RecaptionConfig
from clipdense.recaption.decode import ImageInput, prepare_image
from clipdense.recaption.engines import Captioner, EngineOutputError, check_output, cut_caption
from clipdense.recaption.engines.coca import CocaCaptioner
from clipdense.recaption.engines.echo import EchoCaptioner
from clipdense.recaption.engines.registry import EngineSpec, engine_kinds, engine_spec, register_engine
from clipdense.recaption.engines.resolve import resolve_engine
from clipdense.recaption.engines.sampling import decode_sequences, nucleus, sample_top_p, top_p_filter
from clipdense.recaption.pipeline import CaptionActor, decode_batch
from clipdense.recaption.plan import Plan
from clipdense.recaption.writer import ShardAssembler

SOT, EOT = 8, 9


def test_nucleus_matches_hf_top_p_filter():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    vals, idx, keep = nucleus(probs.log(), 0.7)
    assert idx[keep].tolist() == [0, 1]
    assert torch.isfinite(top_p_filter(probs.log(), 0.7)).tolist() == [[True, True, False, False]]
    g = torch.Generator().manual_seed(0)
    for top_p in (0.3, 0.9):
        logits = torch.randn(8, 5000, generator=g) * 5
        vals, idx, keep = nucleus(logits, top_p)
        mine = torch.zeros(logits.shape, dtype=torch.bool).scatter_(1, idx, keep)
        assert torch.equal(mine, torch.isfinite(top_p_filter(logits, top_p)))


def _fixed_logits(row_logits):
    seen = []

    def next_logits(prefix, rows):
        seen.append(len(rows))
        return row_logits.expand(len(rows), -1).clone()
    return next_logits, seen


def test_sampler_min_length_then_stop_and_pads():
    logits = torch.zeros(10)
    logits[EOT] = 20.0  # end of text wins as soon as it is allowed
    fn, seen = _fixed_logits(logits)
    out = sample_top_p(fn, 6, sot=SOT, eot=EOT, pad=0, seq_len=12, min_seq_len=4, top_p=0.9,
                       generator=torch.Generator().manual_seed(0))
    assert out.shape == (6, 12)
    assert (out[:, 0] == SOT).all() and (out[:, 4] == EOT).all() and (out[:, 5:] == 0).all()
    assert not (out[:, 1:4] == EOT).any()
    assert seen == [6, 6, 6, 6]  # stops calling the model once every row has ended


def test_sampler_forces_end_at_seq_len_and_only_runs_unfinished_rows():
    logits = torch.zeros(10)
    logits[EOT] = -30.0  # never chosen: only the forced end stops a row
    fn, seen = _fixed_logits(logits)
    out = sample_top_p(fn, 3, sot=SOT, eot=EOT, seq_len=7, min_seq_len=2, top_p=0.9,
                       generator=torch.Generator().manual_seed(1))
    assert (out[:, 6] == EOT).all() and not (out[:, 1:6] == EOT).any()
    assert seen == [3] * 5  # positions 1..5 sampled, position 6 forced without a model call


def test_decode_cuts_at_end_token_and_first_period():
    from clipdense.models.registry import tokenizer_for
    tok = tokenizer_for("coca-tiny")
    ids = tok(["a red circle. behind a star"])[0].tolist()  # <sot> ... <eot> 0 0 ...
    texts = decode_sequences(torch.tensor([ids]), tok.decode, tok.sot_token_id, tok.eot_token_id)
    assert texts == ["a red circle . behind a star "]
    assert cut_caption(texts[0], True) == "a red circle"
    assert cut_caption(texts[0], False) == "a red circle . behind a star"


@pytest.fixture(scope="module")
def coca():
    torch.manual_seed(0)
    captioner = CocaCaptioner("coca-tiny", seq_len=12, device="cpu", seed=3)
    # a wide vocabulary projection makes the random captioner's token distribution peaked and its samples varied
    torch.nn.init.normal_(captioner.model.text_decoder.text_projection, std=2.0)
    return captioner


@pytest.mark.parametrize("correct_cls_mask", [False, True])
def test_kv_cached_decoder_equals_open_clip_forward(coca, correct_cls_mask):
    """Cached incremental logits == open_clip's full-prefix forward, with a pad id inside a prefix (masked keys) and
    rows dropping out mid-way; and the sampled captions are identical with and without the cache."""
    from clipdense.recaption.engines.kv_cache import CocaKVDecoder, supports_kv_cache

    model = coca.model
    assert supports_kv_cache(model)
    old, model.text.correct_cls_mask = model.text.correct_cls_mask, correct_cls_mask
    try:
        with torch.no_grad():
            image = model(coca.pixels(_images(3)))  # open_clip's CoCa forward without text: the image outputs
            latent, embs = image["image_features"], image["image_embs"]
            tokens = torch.randint(1, 1000, (3, 10), generator=torch.Generator().manual_seed(0))
            tokens[:, 0], tokens[1, 3], tokens[2, 1] = coca.sot, coca.pad, coca.pad
            decoder = CocaKVDecoder(model, embs, 10)
            for length in range(1, 10):
                rows = torch.arange(3) if length < 5 else torch.tensor([0, 2])
                got = decoder(tokens[rows, :length], rows)
                ref = model(None, tokens[rows, :length], image_latent=latent[rows], image_embs=embs[rows],
                            output_labels=False)["logits"][:, -1]
                assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (length, (got - ref).abs().max())
        samples = {}
        for cached in (True, False):
            coca.kv_cache = cached
            samples[cached] = coca.sample_tokens(_images(4), 2)
        assert torch.equal(samples[True], samples[False])
    finally:
        model.text.correct_cls_mask, coca.kv_cache = old, True


def _images(k, size=64):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(k)]


def test_coca_n_captions_per_image_and_seeded_determinism(coca, tmp_path):
    images = _images(2)
    first = coca.generate(images, 3)
    assert len(first) == 2 and all(len(c) == 3 and all(isinstance(s, str) for s in c) for c in first)
    assert coca.generate(images, 3) == first
    coca.seed = 4
    try:
        assert coca.generate(images, 3) != first
    finally:
        coca.seed = 3
    # a local checkpoint (what the pretrain stage saves) loads into an identical captioner
    path = tmp_path / "coca.pt"
    torch.save(coca.model.state_dict(), path)
    other = CocaCaptioner("coca-tiny", checkpoint=str(path), seq_len=12, device="cpu", seed=3)
    assert other.generate(images, 3) == first


def test_coca_captions_are_a_function_of_seed_and_key_not_batching(coca):
    """CPU fp32: a row's captions are the same alone, in a batch of 3, in another order and in another captioner
    instance (another actor); another key (or seed) gives other captions."""
    images, keys = _images(3), ["k0", "k1", "k2"]
    batch = coca.generate(images, 4, keys=keys)
    alone = [coca.generate([im], 4, keys=[k])[0] for im, k in zip(images, keys)]
    assert batch == alone
    order = [2, 0, 1]
    assert coca.generate([images[i] for i in order], 4, keys=[keys[i] for i in order]) == [batch[i] for i in order]
    other_actor = CocaCaptioner("coca-tiny", seq_len=12, device="cpu", seed=3)
    other_actor.model.load_state_dict(coca.model.state_dict())
    assert other_actor.generate(images[1:], 4, keys=keys[1:]) == batch[1:]
    assert coca.generate(images[:1], 4, keys=["another"])[0] != batch[0]
    assert len({c for caps in batch for c in caps}) > 4                # captions differ across rows and samples


def test_caption_actors_give_each_row_the_same_captions_however_rows_are_split(coca, tmp_path):
    """The pipeline's actor logic (no Ray): one actor captioning 3 rows in one batch == two actors (separate
    engines loaded from one checkpoint) captioning them as batches of 2 and 1, in reversed order."""
    from clipdense.recaption.pipeline import CaptionActor

    path = tmp_path / "coca.pt"
    torch.save(coca.model.state_dict(), path)
    engine = {"kind": "coca", "model": "coca-tiny", "checkpoint": str(path), "num_captions": 2, "seq_len": 12,
              "seed": 7, "device": "cpu"}
    images = _images(3)

    def batch(rows):
        return {"key": np.array([f"key{i}" for i in rows]), "caption": np.array(["c"] * len(rows)),
                "error": np.array([None] * len(rows), dtype=object), "shard": np.array(["s.tar"] * len(rows)),
                "pixels": np.stack([images[i] for i in rows])}

    whole = CaptionActor(engine)(batch([0, 1, 2])).column("syn_captions").to_pylist()
    first, second = CaptionActor(engine), CaptionActor(engine)
    split = second(batch([2])).column("syn_captions").to_pylist() + first(batch([1, 0])).column(
        "syn_captions").to_pylist()
    assert split == [whole[2], whole[1], whole[0]]
    assert all(len(c) == 2 for c in whole) and whole[0] != whole[1]


def test_coca_tiny_top_p_is_greedy_argmax(coca):
    images = _images(2)
    coca.top_p = 1e-9
    try:
        tokens = coca.sample_tokens(images, 2)
    finally:
        coca.top_p = 0.9
    # greedy decoding by hand from open_clip's CoCa forward (full logits, no sampler code)
    with torch.no_grad():
        image = coca.model(coca.pixels(images))
        latent, embs = image["image_features"], image["image_embs"]
        seq = torch.full((2, 1), coca.sot)
        for cur in range(1, coca.seq_len):
            if cur == coca.seq_len - 1:
                seq = torch.cat([seq, torch.full((2, 1), coca.eot)], 1)
                break
            logits = coca.model(None, seq, image_latent=latent, image_embs=embs, output_labels=False)["logits"][:, -1]
            if cur < coca.min_seq_len:
                logits[:, coca.eot] = float("-inf")
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    for i in range(2):
        row = tokens[2 * i].tolist()
        end = row.index(coca.eot) + 1
        assert row[:end] == seq[i, :end].tolist()
        assert tokens[2 * i + 1].tolist() == row  # greedy: both samples of an image agree


def test_coca_accepts_pil_and_other_sizes(coca):
    out = coca.generate([Image.new("RGB", (90, 40), "red"), _images(1, 33)[0]], 2)
    assert len(out) == 2 and all(len(c) == 2 for c in out)


def test_echo_and_output_checks():
    assert EchoCaptioner().generate(_images(2), 3, ["a", None]) == [["a"] * 3, [""] * 3]
    with pytest.raises(ValueError):
        EchoCaptioner().generate(_images(2), 3)
    assert check_output([["x", "y"]], 1, 2) == [["x", "y"]]
    for bad in ([["x"]], [["x", 1]], [], "xy"):
        with pytest.raises(EngineOutputError):
            check_output(bad, 1, 2)


def _png(size, mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


def test_prepare_image_modes_and_errors():
    arr = prepare_image(jpeg_bytes(1, 100), ImageInput(size=48))
    assert arr.shape == (48, 48, 3) and arr.dtype == np.uint8
    assert prepare_image(_png((30, 70), "RGBA"), ImageInput(size=16)).shape == (16, 16, 3)
    small = prepare_image(jpeg_bytes(2, 120), ImageInput(mode="jpeg", max_pixels=60 * 60))
    w, h = Image.open(io.BytesIO(small)).size
    assert w * h <= 60 * 60 and w == h
    kept = jpeg_bytes(3, 40)
    assert prepare_image(kept, ImageInput(mode="jpeg", max_pixels=60 * 60)) == kept  # small JPEG shipped as is
    with pytest.raises(ImageError, match="image_too_large: 2000x1000 > max_image_pixels=1000000"):
        prepare_image(_png((2000, 1000), "L"), ImageInput(max_image_pixels=1_000_000))
    good = jpeg_bytes(4, 64)
    for bad, code in ((good[: len(good) // 2], "undecodable_image"), (b"not an image", "undecodable_image"),
                      (b"", "no_image"), (None, "no_image")):
        with pytest.raises(ImageError) as e:
            prepare_image(bad, ImageInput(size=32))
        assert e.value.code == code


def test_decode_batch_records_errors_and_keeps_rows():
    batch = pa.table({
        "key": ["ok", "bad", "nocap", "prior"], "image_bytes": [jpeg_bytes(1), b"xx", jpeg_bytes(2), None],
        "caption": ["c", "c", " ", None], "error_code": [None, None, None, "no_image"],
        "error": [None, None, None, "found: pdf"], "shard": ["s.tar"] * 4})
    out = decode_batch(batch, ImageInput(size=16), keep_images=True)
    assert out.column("key").to_pylist() == ["ok", "bad", "nocap", "prior"]
    # an image without alt text is decoded for the captioner like any other
    assert out.column("error_code").to_pylist() == [None, "undecodable_image", None, "no_image"]
    errs = out.column("error").to_pylist()
    assert errs[0] is None and errs[1] == "UnidentifiedImageError: cannot identify image file <_io.BytesIO>"
    assert errs[2] is None and errs[3] == "found: pdf"  # an earlier stage's error passes through
    pixels = out.column("pixels").chunk(0).to_numpy()
    assert pixels.shape == (4, 16, 16, 3) and pixels[0].any() and not pixels[1].any() and pixels[2].any()
    assert out.column("image_bytes").to_pylist()[0] == jpeg_bytes(1)


@pytest.mark.gpu
def test_coca_on_cuda_bf16_is_seeded_and_matches_cpu_greedy():
    torch.manual_seed(0)
    gpu = CocaCaptioner("coca-tiny", seq_len=12, device="cuda", seed=5)
    torch.nn.init.normal_(gpu.model.text_decoder.text_projection, std=2.0)
    images = _images(4)
    first = gpu.generate(images, 5, keys=["a", "b", "c", "d"])
    assert len(first) == 4 and all(len(c) == 5 for c in first)
    assert gpu.generate(images, 5, keys=["a", "b", "c", "d"]) == first  # seeded on the GPU too
    gpu.top_p = 1e-9  # greedy: bf16 autocast on CUDA picks the same first tokens as fp32 on CPU
    cpu = CocaCaptioner("coca-tiny", seq_len=12, device="cpu")
    cpu.model.load_state_dict(gpu.model.state_dict())
    cpu.top_p = 1e-9
    g, c = gpu.sample_tokens(images, 1).cpu(), cpu.sample_tokens(images, 1)
    assert (g[:, :3] == c[:, :3]).float().mean() >= 0.75


class ShoutCaptioner(Captioner):
    """A toy engine from outside the package: each original caption upper-cased, with the image side it was handed
    and the caption index."""
    kind = "shout"

    def generate(self, images, n, captions=None, keys=None):
        return [[f"{c.upper()} {np.asarray(im).shape[0]}PX #{j}" for j in range(n)] for im, c in zip(images, captions)]


@register_engine
def shout_engine() -> EngineSpec:
    return EngineSpec(name="shout", build=lambda cfg: ShoutCaptioner(), sampling=lambda cfg: {"n": cfg.samples},
                      check=lambda cfg, remote: 40, caption_seeds=lambda cfg, key: [len(key) + j for j in
                                                                                    range(cfg.samples)],
                      default_model="shout-1", weights=lambda cfg: f"revision:shout-{cfg.seed}",
                      prompt=lambda cfg: "SHOUT")


def test_a_registered_engine_runs_through_resolve_decode_actor_and_writer():
    """The toy engine chosen by `engine.kind` alone: the driver resolves it (its image side, its provenance), the CPU
    step decodes for it, the actor logic builds and calls it, the assembler writes its columns."""
    cfg = build_config(RecaptionConfig, {"input": "x", "output": "y", "engine": {"kind": "shout", "num_captions": 2,
                                                                                  "seed": 5}})
    engine = resolve_engine(cfg.engine, cfg.decode, remote=False)
    assert (engine.image.mode, engine.image.size) == ("array", 40)
    rows = pa.table({"key": ["k1", "key2"], "image_bytes": [jpeg_bytes(1), jpeg_bytes(2)], "caption": ["a cat", "b"],
                     "error_code": pa.nulls(2, pa.string()), "error": pa.nulls(2, pa.string()),
                     "shard": ["/d/s.tar"] * 2})
    captioned = CaptionActor(cfg.engine.model_dump())(decode_batch(rows, engine.image))
    written = {}
    asm = ShardAssembler(Plan(inputs={"s": "/d/s.tar"}, outputs={"s": "/o/s.parquet"}, done=[]), engine.provenance,
                         write=lambda t, path: written.setdefault(path, t.to_pylist()), seeds=engine.caption_seeds)
    asm.add(captioned)
    asm.finish()
    out = written["/o/s.parquet"]
    assert [r["syn_captions"] for r in out] == [["A CAT 40PX #0", "A CAT 40PX #1"], ["B 40PX #0", "B 40PX #1"]]
    assert [r["syn_seeds"] for r in out] == [[2, 3], [4, 5]]
    assert {k: out[1][k] for k in ("engine", "model", "prompt", "weights")} == {
        "engine": "shout", "model": "shout-1", "prompt": "SHOUT", "weights": "revision:shout-5"}
    assert json.loads(out[0]["sampling"]) == {"n": 2}


def test_unknown_engine_kinds_and_taken_names_are_refused(capsys):
    assert engine_kinds() == ["coca", "echo", "shout", "vllm"]
    assert cli_main(["recaption", "input=x", "output=y", "engine.kind=shuot"]) == 2
    err = capsys.readouterr().err.strip()
    assert "engine.kind" in err and "not a registered engine (coca, echo, shout, vllm)" in err
    assert len(err.splitlines()) == 1
    with pytest.raises(ConfigError, match=r"^engine.kind 'x' is not a registered engine \(coca, echo, shout, vllm\)$"):
        engine_spec("x")
    with pytest.raises(ValueError, match="engine 'echo' is already registered"):
        register_engine(EngineSpec(name="echo", build=lambda cfg: ShoutCaptioner(), sampling=lambda cfg: {}))
    assert cli_main(["recaption", "input=x", "output=y", "engine.kind=shout", "--print-config"]) == 0
    assert "kind: shout" in capsys.readouterr().out
