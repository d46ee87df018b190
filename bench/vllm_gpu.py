"""The `vllm` captioner engine on a GPU: images/s per GPU for a Qwen2.5-VL-7B-architecture model, offline.

No weights are downloaded (the GPU machine has no network): the model directory holds Qwen2.5-VL-7B-Instruct's
architecture (config values as published), our small offline tokenizer/processor (clipdense.recaption.tiny_vlm)
and no weight files; vLLM fills the weights randomly (`load_format="dummy"`). Random weights would stop at random
end tokens, so every caption has a fixed length (`min_tokens = max_tokens`, `ignore_eos`) and the figure is
comparable across runs: images/s = (images x N captions x L tokens + the image prefill) per second.
Images are random 448x448 RGB (the engine's default max_pixels), handed over as the pipeline's CPU stage would
(PIL images already under the pixel cap), through `VLLMCaptioner.generate` in batches of `--batch`, each
request seeded from its row key. Needs CUDA vLLM (`pip install 'clipdense[vllm]'`) and transformers; no Ray.

    python -m bench.vllm_gpu [--images 512] [--n 5] [--tokens 30] [--batch 256] [--tp 1] [--quick]
    $(clipdense vllm-env DIR) -m bench.vllm_gpu --smoke     # the same path at toy size on CPU vLLM
Writes bench/results/vllm_gpu.json (and a copy under $OUT when set).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clipdense.recaption.engines.vllm import VLLMCaptioner, sampling_kwargs
from clipdense.recaption.tiny_vlm import token_config, write_processor

RESULTS = Path(__file__).resolve().parent / "results"

# Qwen/Qwen2.5-VL-7B-Instruct config.json (text and vision towers; token ids come from our tokenizer)
QWEN25_VL_7B_TEXT = {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                     "num_attention_heads": 28, "num_key_value_heads": 4, "hidden_act": "silu",
                     "max_position_embeddings": 128000, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                     "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "sliding_window": 32768,
                     "use_sliding_window": False, "max_window_layers": 28, "tie_word_embeddings": False}
QWEN25_VL_7B_VISION = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                       "in_channels": 3, "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2,
                       "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
                       "tokens_per_second": 2, "hidden_act": "silu"}


# --smoke: the same architecture at toy size, so the script's whole path runs on a CPU vLLM (`clipdense vllm-env`)
SMOKE_TEXT = {**QWEN25_VL_7B_TEXT, "vocab_size": 512, "hidden_size": 128, "intermediate_size": 256,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 4096, "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]}}
SMOKE_VISION = {**QWEN25_VL_7B_VISION, "depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4,
                "out_hidden_size": 128, "fullatt_block_indexes": [1]}


def write_model_dir(out: Path, max_pixels: int, smoke: bool = False) -> Path:
    """Config + tokenizer + processor of a Qwen2.5-VL-7B-architecture model; no weights (vLLM's dummy load)."""
    from transformers import Qwen2_5_VLConfig  # only the vLLM environments have transformers

    ids = write_processor(out, max_pixels=max_pixels, processor_class="Qwen2_5_VLProcessor")
    text, vision = (SMOKE_TEXT, SMOKE_VISION) if smoke else (QWEN25_VL_7B_TEXT, QWEN25_VL_7B_VISION)
    cfg = Qwen2_5_VLConfig(text_config={**text, "bos_token_id": ids["<|endoftext|>"],
                                        "eos_token_id": ids["<|im_end|>"]},
                           vision_config=vision, tie_word_embeddings=False, **token_config(ids))
    cfg.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    cfg.dtype = "bfloat16"
    cfg.save_pretrained(out)
    return out


def random_images(count: int, side: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)) for _ in range(count)]


def fixed_length(captioner, tokens: int) -> None:
    """Every caption exactly `tokens` long (random weights stop anywhere otherwise; token ids beyond our small
    tokenizer are not detokenized); the per-row seed stays."""
    def sampling_params(n, seed=None):
        kwargs = {**sampling_kwargs(n, captioner.top_p, captioner.temperature, tokens), "min_tokens": tokens,
                  "ignore_eos": True, "detokenize": False}
        if seed is not None:
            kwargs["seed"] = seed
        return captioner._vllm.SamplingParams(**kwargs)
    captioner.sampling_params = sampling_params


def measure(args) -> dict:
    side = int(args.max_pixels ** 0.5) // 28 * 28
    with tempfile.TemporaryDirectory(prefix="qwen25vl7b-random-") as tmp:
        model = write_model_dir(Path(tmp), args.max_pixels, args.smoke)
        t0 = time.perf_counter()
        captioner = VLLMCaptioner(str(model), prompt="Describe this image in one sentence.", max_tokens=args.tokens,
                                  max_pixels=args.max_pixels, seed=0, engine_kwargs={
                                      "load_format": "dummy", "dtype": "bfloat16", "max_model_len": 4096,
                                      "tensor_parallel_size": args.tp, "limit_mm_per_prompt": {"image": 1, "video": 0},
                                      **({} if args.smoke else {"gpu_memory_utilization": 0.85})})
        load_s = time.perf_counter() - t0
        fixed_length(captioner, args.tokens)
        images = random_images(args.images, side)
        captioner.generate(images[: min(len(images), 32)], args.n, keys=[f"warm{i}" for i in range(32)][:len(images)])
        t0 = time.perf_counter()
        done = 0
        for i in range(0, len(images), args.batch):
            chunk = images[i:i + args.batch]
            out = captioner.generate(chunk, args.n, keys=[f"img{i + j}" for j in range(len(chunk))])
            assert len(out) == len(chunk) and all(len(c) == args.n for c in out)
            done += len(chunk)
        seconds = time.perf_counter() - t0
        captioner.close()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    ips = done / seconds
    arch = "toy-size Qwen2.5-VL (--smoke)" if args.smoke else "Qwen2.5-VL-7B architecture"
    return {"bench": "vllm_gpu", "gpu": gpu, "tensor_parallel_size": args.tp, "model": f"{arch}, "
            "random weights (vLLM load_format=dummy)", "image_side": side, "images": done, "captions_per_image": args.n,
            "tokens_per_caption": args.tokens, "batch": args.batch, "engine_load_s": round(load_s, 1),
            "seconds": round(seconds, 2), "images_per_s_per_gpu": round(ips / args.tp, 2),
            "captions_per_s_per_gpu": round(ips * args.n / args.tp, 2),
            "output_tokens_per_s_per_gpu": round(ips * args.n * args.tokens / args.tp, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.vllm_gpu", description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--n", type=int, default=5, help="captions per image (DataCompDR: 5)")
    ap.add_argument("--tokens", type=int, default=30, help="fixed output length per caption")
    ap.add_argument("--batch", type=int, default=256, help="images per generate call (engine.batch_size)")
    ap.add_argument("--max-pixels", type=int, default=448 * 448)
    ap.add_argument("--tp", type=int, default=1, help="tensor_parallel_size")
    ap.add_argument("--quick", action="store_true", help="32 images: a smoke run, not a figure")
    ap.add_argument("--smoke", action="store_true", help="toy-size model, 8 small images: runs on CPU vLLM")
    args = ap.parse_args(argv)
    if args.quick:
        args.images = 32
    if args.smoke:
        args.quick, args.images, args.max_pixels, args.batch = True, 8, 112 * 112, 4
    result = measure(args)
    print(json.dumps(result, indent=1))
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "vllm_gpu.json").write_text(json.dumps(result, indent=1) + "\n")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "vllm_gpu.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
