"""Caption quality stats: lengths, distinct-n, CLIP score; config files shipped with the stage."""
import numpy as np
import pytest
import torch
from PIL import Image

from clipdense.config import configs_dir, load_config
from clipdense.recaption import RecaptionConfig
from clipdense.recaption.clip_score import clip_scores
from clipdense.recaption.stats import caption_stats, distinct_n, text_stats


def test_distinct_n_and_lengths():
    texts = ["a red circle", "a red square", "A red circle!"]
    assert distinct_n(texts, 1) == pytest.approx(4 / 9)  # a, red, circle, square over 9 words
    assert distinct_n(texts, 2) == pytest.approx(3 / 6)  # (a red) (red circle) (red square)
    assert distinct_n([], 2) == 0.0 and distinct_n(["one"], 2) == 0.0
    s = text_stats(texts + [""])
    assert s["count"] == 4 and s["words_mean"] == pytest.approx(9 / 4) and s["empty"] == 1
    assert s["words_max"] == 3 and s["words_percentiles"]["p50"] == 3.0
    c = caption_stats([["x y", "x y"], ["x z", "w"]], ["orig one", None])
    assert c["synthetic"]["unique_per_image_mean"] == 1.5 and c["original"]["count"] == 1


def test_clip_score_is_100_times_clamped_cosine():
    from clipdense.models.registry import create_clip_and_transforms, tokenizer_for

    torch.manual_seed(0)
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8))
              for i in range(2)]
    texts = [["a cat", "a dog"], ["a red square"]]
    torch.manual_seed(1)
    got = clip_scores("clip-tiny", None, images, texts)
    torch.manual_seed(1)  # same random init: the score computed by hand
    model, _, pre = create_clip_and_transforms("clip-tiny")
    model.eval()
    tok = tokenizer_for("clip-tiny")
    with torch.no_grad():
        img = torch.nn.functional.normalize(model.encode_image(torch.stack([pre(i) for i in images])), dim=-1)
        for i, ts in enumerate(texts):
            txt = torch.nn.functional.normalize(model.encode_text(tok(ts)), dim=-1)
            want = (100 * (txt @ img[i]).clamp(min=0)).mean().item()
            assert got[i] == pytest.approx(want, rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("name", ["coca-tiny", "coca-vitl14-datacompdr", "qwen2.5vl-7b-vllm", "echo"])
def test_shipped_configs_load(name):
    cfg = load_config(RecaptionConfig, configs_dir() / "recaption" / f"{name}.yaml")
    assert cfg.engine.kind in name or (name.startswith("qwen") and cfg.engine.kind == "vllm")
    if name == "coca-vitl14-datacompdr":  # the DataCompDR recipe
        e = cfg.engine
        assert (e.model_name, e.pretrained, e.num_captions, e.top_p, e.seq_len, e.cut) == (
            "coca_ViT-L-14", "mscoco_finetuned_laion2B-s13B-b90k", 5, 0.9, 30, True)
