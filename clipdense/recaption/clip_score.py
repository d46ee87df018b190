"""The optional CLIP score of the caption stats (`stats.clip_model`): 100 * max(cos(image, caption), 0) over a
sample of the input images, i.e. CLIPScore without its w = 2.5 rescaling. Imports torch and open_clip: stats.py
loads this module only when a CLIP model is asked for."""
from __future__ import annotations

import numpy as np
import torch

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


def clip_section(st: StatsConfig, images: dict, ok: dict[str, tuple]) -> dict:
    """The `clip` section of the stats: mean CLIP scores of the synthetic and original captions (`ok`: key ->
    (caption, syn_captions) of captioned rows) over the sampled `images` (key -> decoded image)."""
    device = "cuda" if st.device == "cuda" or (st.device == "auto" and torch.cuda.is_available()) else "cpu"
    scorer = ClipScorer(st.clip_model, st.clip_pretrained, device)
    keys = list(images)
    syn = scorer.scores(list(images.values()), [ok[k][1] for k in keys])
    with_alt = [k for k in keys if ok[k][0]]  # images without alt text are recaptioned too
    orig = scorer.scores([images[k] for k in with_alt], [[ok[k][0]] for k in with_alt]) if with_alt else []
    return {"clip_model": st.clip_model, "clip_pretrained": st.clip_pretrained, "images": len(keys),
            "clip_score_synthetic": round(float(np.mean(syn)), 3) if syn else None,
            "clip_score_original": round(float(np.mean(orig)), 3) if orig else None}
