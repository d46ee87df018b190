"""`coca`: an open_clip CoCa captioner with DataCompDR's recipe (N samples per image, top-p 0.9, temperature 1,
seq_len 30 tokens, text cut at the first period), sampled by our own loop (sampling.py) over open_clip's CoCa
forward, so no `transformers` is needed.

Vectorised: the image tower runs once per image; its embeddings are repeated N times and all B*N sequences are
sampled together. CPU or CUDA; `precision` fp32, bf16 (autocast) or auto: bf16 on CUDA, fp32 on a CPU (bf16
measured slower there for sampling; `CLIPDENSE_CPU_BF16=1` forces it: train/precision.py).

Seeding: each caption's draws come from (engine seed, row key, caption index) (sampling.sequence_uniforms), so a
row's captions do not depend on the batch it came in, the actor or the order. On CPU in fp32 that makes captions
exact across batchings (tested), and in bf16 on CPU too (tested on coca-tiny); on CUDA in bf16 the draws are the
same but the logits can differ in the last bits with the batch shape (kernel choice), which can flip a token whose
uniform sits on a nucleus boundary: rare, not exact. Without keys (direct calls) a row's key is a hash of its
pixels.
"""
from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np
import open_clip
import torch

from clipdense.config import ConfigError
from clipdense.data.images import fit_square
from clipdense.models import open_clip_adapter as oca
from clipdense.models.registry import create_clip, register_model_configs, tokenizer_for
from clipdense.recaption.engines.base import Captioner, ImageLike, cut_caption, to_pil
from clipdense.recaption.engines.kv_cache import CocaKVDecoder, supports_kv_cache
from clipdense.recaption.engines.sampling import decode_sequences, sample_top_p, sequence_uniforms
from clipdense.train.precision import autocast, resolve_precision


def coca_image_size(model: str) -> int | None:
    """The image side of an open_clip model config, without building the model (None if unknown)."""
    register_model_configs()
    cfg = open_clip.get_model_config(model) or {}
    size = cfg.get("vision_cfg", {}).get("image_size")
    return int(size[0] if isinstance(size, (list, tuple)) else size) if size else None


def check_coca(model: str, checkpoint: str | None, seq_len: int) -> int | None:
    """Driver-side checks of a coca engine config (one-line ConfigErrors); returns the model's image side."""
    register_model_configs()
    if model not in open_clip.list_models():
        raise ConfigError(f"engine.model: unknown open_clip model {model!r}")
    if checkpoint and "://" not in checkpoint and not Path(checkpoint).is_file():
        raise ConfigError(f"engine.checkpoint: file not found: {checkpoint}")
    ctx = (open_clip.get_model_config(model) or {}).get("text_cfg", {}).get("context_length", 77)
    if seq_len > ctx:
        raise ConfigError(f"engine.seq_len {seq_len} exceeds {model}'s context length {ctx}")
    return coca_image_size(model)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class CocaCaptioner(Captioner):
    kind = "coca"

    def __init__(self, model: str = "coca_ViT-L-14", pretrained: str | None = None, checkpoint: str | None = None,
                 *, top_p: float = 0.9, temperature: float = 1.0, seq_len: int = 30, min_seq_len: int = 5,
                 cut_at_period: bool = True, seed: int = 0, device: str = "auto", kv_cache: bool = True,
                 precision: str = "auto"):
        if checkpoint and not Path(checkpoint).is_file():
            raise FileNotFoundError(f"CoCa checkpoint not found: {checkpoint}")
        self.device = pick_device(device)
        self.model = create_clip(model, pretrained=checkpoint or pretrained).to(self.device).eval()
        if not oca.is_coca(self.model):
            raise ValueError(f"{model} is not a CoCa model (no text decoder)")
        # auto: bf16 on CUDA; fp32 on a CPU, where bf16 sampling measured slower (0.95x on coca-demo, 0.97x on
        # coca-tiny: bench/results/bf16_cpu.md) unless CLIPDENSE_CPU_BF16=1 forces it
        self.precision = resolve_precision(precision, self.device, self.model, cpu_measured_faster=False)
        self.tokenizer = tokenizer_for(model)
        self.sot = int(getattr(self.tokenizer, "sot_token_id", 49406))
        self.eot = int(getattr(self.tokenizer, "eot_token_id", 49407))
        self.pad = int(getattr(self.model, "pad_id", 0))
        context = int(getattr(self.model, "context_length", 77))
        if seq_len > context:
            raise ValueError(f"seq_len {seq_len} exceeds {model}'s text context length {context}")
        pre = oca.preprocess_cfg(self.model)
        size = pre.get("size", getattr(self.model.visual, "image_size", 224))
        self.image_size = int(size[0] if isinstance(size, (list, tuple)) else size)
        self.mean = torch.tensor(pre.get("mean", (0.48145466, 0.4578275, 0.40821073)), device=self.device)
        self.std = torch.tensor(pre.get("std", (0.26862954, 0.26130258, 0.27577711)), device=self.device)
        self.top_p, self.temperature = top_p, temperature
        self.seq_len, self.min_seq_len, self.cut_at_period = seq_len, min_seq_len, cut_at_period
        self.seed = seed  # with each row's key, seeds that row's captions (sampling.sequence_uniforms)
        # our cached decoder (kv_cache.py) where the model's towers are open_clip's stock ones; else its forward
        self.kv_cache = kv_cache and supports_kv_cache(self.model)

    def _autocast(self):
        return autocast(self.device, self.precision)

    def pixels(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """Images -> normalised [B, 3, S, S]; uint8 arrays already S x S (from the CPU stage) are used as is."""
        arrs = []
        for im in images:
            a = im if isinstance(im, np.ndarray) else None
            if a is None or a.shape != (self.image_size, self.image_size, 3) or a.dtype != np.uint8:
                a = np.asarray(fit_square(to_pil(im), self.image_size), dtype=np.uint8)
            arrs.append(a)
        x = torch.from_numpy(np.stack(arrs)).to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().div_(255)
        return (x - self.mean[:, None, None]) / self.std[:, None, None]

    @torch.no_grad()
    def sample_tokens(self, images: Sequence[ImageLike], n: int, keys: Sequence[str] | None = None) -> torch.Tensor:
        """[len(images) * n, seq_len] token ids; rows i*n .. i*n+n-1 belong to image i (key keys[i])."""
        x = self.pixels(images)
        if keys is None:
            keys = [hashlib.blake2b(row.cpu().numpy().tobytes(), digest_size=16).hexdigest() for row in x]
        uniforms = sequence_uniforms(self.seed, keys, n, self.seq_len)
        with self._autocast():
            latent, embs = oca.coca_encode_image(self.model, x)
        latent, embs = latent.repeat_interleave(n, 0), embs.repeat_interleave(n, 0)

        if self.kv_cache:
            with self._autocast():  # the image keys/values are projected here: inside autocast, in its dtype
                decoder = CocaKVDecoder(self.model, embs, self.seq_len)

            def next_logits(prefix: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
                with self._autocast():
                    return decoder(prefix, rows)
            trim = contextlib.nullcontext()
        else:
            def next_logits(prefix: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
                with self._autocast():  # open_clip's CoCa forward with precomputed image embeddings
                    return oca.coca_logits(self.model, prefix, latent[rows], embs[rows])[:, -1]
            trim = oca.last_position_logits(self.model)  # project only the last position to the vocabulary

        with trim:
            return sample_top_p(next_logits, len(images) * n, sot=self.sot, eot=self.eot, pad=self.pad,
                                seq_len=self.seq_len, min_seq_len=self.min_seq_len, top_p=self.top_p,
                                temperature=self.temperature, device=self.device, uniforms=uniforms)

    def generate(self, images: Sequence[ImageLike], n: int, captions: Sequence[str | None] | None = None,
                 keys: Sequence[str] | None = None) -> list[list[str]]:
        if not images:
            return []
        if keys is not None and len(keys) != len(images):
            raise ValueError(f"{len(keys)} keys for {len(images)} images")
        tokens = self.sample_tokens(images, n, keys).cpu()
        texts = decode_sequences(tokens, self.tokenizer.decode, self.sot, self.eot)
        texts = [cut_caption(t, self.cut_at_period) for t in texts]
        return [texts[i * n:(i + 1) * n] for i in range(len(images))]

    def close(self) -> None:
        del self.model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
