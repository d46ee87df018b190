"""The optional CLIP score of the caption stats (`stats.clip_model`): 100 * max(cos(image, caption), 0) over a
sample of the input images, i.e. CLIPScore without its w = 2.5 rescaling. Imports torch and open_clip: stats.py
loads this module only when a CLIP model is asked for."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow.parquet as pq
import torch

from clipdense.data.images import ImageError, decode_rgb
from clipdense.data.paths import ShardFiles
from clipdense.data.tar_rows import iter_tar_samples
from clipdense.models.registry import create_clip_and_transforms, tokenizer_for
from clipdense.recaption.config import StatsConfig


class ClipScorer:
    """A CLIP model with its preprocessing and tokenizer, loaded once."""

    def __init__(self, model_name: str, pretrained: str | None, device: str = "cpu"):
        model, _, self.preprocess = create_clip_and_transforms(model_name, pretrained=pretrained)
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer_for(model_name)
        self.device = device

    @torch.no_grad()
    def scores(self, images: list, texts: list[list[str]], batch_size: int = 64) -> list[float]:
        """Mean over each image's texts of 100 * max(cos, 0), per image."""
        out = []
        for s in range(0, len(images), batch_size):
            ims, txts = images[s:s + batch_size], texts[s:s + batch_size]
            x = torch.stack([self.preprocess(im) for im in ims]).to(self.device)
            img = torch.nn.functional.normalize(self.model.encode_image(x).float(), dim=-1)
            flat = [t for ts in txts for t in ts]
            tokens = self.tokenizer(flat).to(self.device)
            txt = torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1)
            owner = torch.tensor([i for i, ts in enumerate(txts) for _ in ts], device=self.device)
            cos = (img[owner] * txt).sum(-1).clamp(min=0) * 100
            out += [float(cos[owner == i].mean()) for i in range(len(ims))]
        return out


def clip_scores(model_name: str, pretrained: str | None, images: list, texts: list[list[str]],
                device: str = "cpu", batch_size: int = 64) -> list[float]:
    """Mean over each image's texts of 100 * max(cos, 0), per image."""
    return ClipScorer(model_name, pretrained, device).scores(images, texts, batch_size)


def _input_images(shards: ShardFiles) -> Iterator[tuple[str, bytes]]:
    """(key, encoded image) of every input row that has an image, in shard order."""
    for uri in shards.files:
        with shards.storage.at(uri).open_input_file() as f:
            if uri.endswith(".tar"):
                rows = iter_tar_samples(f, uri, "none")
            else:
                rows = pq.read_table(f, columns=["key", "image_bytes"]).to_pylist()
            yield from ((r["key"], r["image_bytes"]) for r in rows if r.get("image_bytes"))


def sample_images(shards: ShardFiles, keys: set[str], limit: int, max_image_pixels: int) -> dict:
    """The first `limit` images of these keys in the input shards, decoded (key -> PIL image). One that does not
    decode is left out (the same key in another input shard may hold other bytes)."""
    found: dict[str, bytes] = {}
    for key, blob in _input_images(shards):
        if key in keys:
            found[key] = blob
            if len(found) >= limit:
                break
    decoded = {}
    for key, blob in found.items():
        try:
            decoded[key] = decode_rgb(blob, max_image_pixels)
        except ImageError:
            continue
    return decoded


def clip_section(st: StatsConfig, shards: ShardFiles, data: dict[str, list], max_image_pixels: int) -> dict:
    """The `clip` section of the stats: mean CLIP scores of the synthetic and original captions of captioned rows,
    over up to `st.clip_sample` of their images found in the input shards."""
    ok = {k: (c, s) for k, c, s, e in zip(data["key"], data["caption"], data["syn_captions"], data["error_code"])
          if e is None and s}
    device = "cuda" if st.device == "cuda" or (st.device == "auto" and torch.cuda.is_available()) else "cpu"
    scorer = ClipScorer(st.clip_model, st.clip_pretrained, device)
    images = sample_images(shards, set(ok), st.clip_sample, max_image_pixels)
    keys = list(images)
    syn = scorer.scores(list(images.values()), [ok[k][1] for k in keys])
    with_alt = [k for k in keys if ok[k][0]]  # images without alt text are recaptioned too
    orig = scorer.scores([images[k] for k in with_alt], [[ok[k][0]] for k in with_alt]) if with_alt else []
    return {"clip_model": st.clip_model, "clip_pretrained": st.clip_pretrained, "images": len(keys),
            "clip_score_synthetic": round(float(np.mean(syn)), 3) if syn else None,
            "clip_score_original": round(float(np.mean(orig)), 3) if orig else None}
