"""A tiny random Qwen2-VL-style model directory, built offline: `python -m clipdense.recaption.tiny_vlm OUT`.

For tests and for smoke-testing a cluster's captioner setup (vLLM loads it like Qwen/Qwen2-VL-2B-Instruct) without
downloading weights. Runs where `transformers` and `tokenizers` are installed (the `clipdense vllm-env` venv).
Contents: a byte-level BPE tokenizer trained on a few sentences plus Qwen's special tokens, Qwen's chat template,
a Qwen2-VL image processor (56^2..112^2 pixels), and a 2-layer text + 2-layer vision model with random weights
(bf16 safetensors, ~1 MB). The processor's parts are written one by one: saving it as a whole needs a working
torchvision for the video processor (REFERENCE.md, "vLLM on CPU").
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
           "<|image_pad|>", "<|video_pad|>"]
CORPUS = ["a photo of a cat sitting on a red sofa", "a dog running on the beach at sunset",
          "two people riding bicycles down a city street", "a bowl of fruit on a wooden table",
          "a mountain landscape with snow and a blue sky", "an aerial view of a green field and a river",
          "a close up of a yellow flower", "a car parked in front of a small house",
          "Describe this image in one sentence.", "You are a helpful assistant."]
# Qwen2-VL's chat template (image/video placeholders; a default system turn).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MIN_PIXELS, MAX_PIXELS = 56 * 56, 112 * 112


def build_tokenizer(out: Path, vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=None, model_max_length=1024)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def write_processor(out: Path, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS,
                    processor_class: str = "Qwen2VLProcessor") -> dict[str, int]:
    """Tokenizer, image processor, chat template and processor config in `out`; returns the special token ids."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out)
    Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=14, temporal_patch_size=2,
                          merge_size=2).save_pretrained(out)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (out / "processor_config.json").write_text(json.dumps({"processor_class": processor_class}, indent=1))
    return {**{t: tok.convert_tokens_to_ids(t) for t in SPECIAL}, "vocab": len(tok)}


def token_config(ids: dict[str, int]) -> dict[str, int]:
    """The top-level special-token fields of a Qwen2-VL / Qwen2.5-VL config."""
    return {"image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
            "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
            "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"]}


def build(out: str | Path, seed: int = 0) -> Path:
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    out = Path(out)
    ids = write_processor(out)
    text = {"vocab_size": (ids["vocab"] + 63) // 64 * 64, "hidden_size": 128, "intermediate_size": 256,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
            "max_position_embeddings": 1024, "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]},
            "rope_theta": 10000.0, "tie_word_embeddings": True, "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"]}
    vision = {"depth": 2, "embed_dim": 64, "hidden_size": 128, "num_heads": 4, "mlp_ratio": 2, "in_channels": 3,
              "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
    cfg = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **token_config(ids))
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(cfg).to(torch.bfloat16)
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(out, safe_serialization=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clipdense.recaption.tiny_vlm",
                                description="Write a tiny random Qwen2-VL-style model directory (offline).")
    p.add_argument("out", metavar="OUT")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(build(args.out, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
