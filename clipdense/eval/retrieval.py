"""Image-text retrieval R@1/5/10 both ways over paired rows, with pretrain's `retrieval_metrics` (the same figures
pretraining reports on its held-out split), images through the model's eval preprocessing."""
from __future__ import annotations

import torch

from clipdense.eval.zeroshot import autocast_for, open_image


@torch.no_grad()
def evaluate_retrieval(model, tokenizer, preprocess, rows: list[dict], *, device: torch.device,
                       autocast_dtype: torch.dtype | None = None, batch_size: int = 64) -> dict:
    """`rows`: dicts with key, image_bytes, caption. Rows whose image cannot be decoded are listed in `errors`."""
    from clipdense.pretrain.task import retrieval_metrics

    images, captions, errors = [], [], []
    for r in rows:
        try:
            images.append(preprocess(open_image(r["image_bytes"])))
            captions.append(r["caption"])
        except Exception as e:  # noqa: BLE001 - an undecodable row is recorded, not fatal
            errors.append(f"{r['key']}: {type(e).__name__}")
    if len(images) < 2:
        return {"rows": len(images), "errors": errors}
    img_f, txt_f = [], []
    with autocast_for(device, autocast_dtype):
        for i in range(0, len(images), batch_size):
            img_f.append(model.encode_image(torch.stack(images[i:i + batch_size]).to(device), normalize=True).float())
            txt_f.append(model.encode_text(tokenizer(captions[i:i + batch_size]).to(device), normalize=True).float())
    metrics = retrieval_metrics(torch.cat(img_f).cpu(), torch.cat(txt_f).cpu(), ks=(1, 5, 10))
    return {**metrics, "rows": len(images), "errors": errors}
