"""Image-text retrieval R@1/5/10 both ways over paired rows, with `eval.metrics.retrieval_metrics` (the same figures
pretraining reports on its held-out split), images through the model's eval preprocessing. The rows are the first
usable ones of image-text shards (read with Ray Data)."""
from __future__ import annotations

import torch

from clipdense.config import DataError
from clipdense.data.images import decode_rgb
from clipdense.data.paths import expand_shards
from clipdense.data.shards import read_shards
from clipdense.data.storage import Storage
from clipdense.eval.config import RetrievalConfig
from clipdense.eval.metrics import retrieval_metrics
from clipdense.eval.zeroshot import autocast_for


def retrieval_rows(shards: list[Storage], max_rows: int) -> tuple[list[dict], dict]:
    """The first `max_rows` usable rows of `shards` (read with Ray Data) and the skipped rows counted by error code."""
    rows, skipped = [], {}
    ds = read_shards(expand_shards(shards)).select_columns(["key", "image_bytes", "caption", "error_code"])
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=256):
        for r in batch.to_pylist():
            # retrieval needs the real caption (the reader no longer flags rows without one)
            code = r["error_code"] or (None if (r["caption"] or "").strip() else "no_caption")
            if code is not None:
                skipped[code] = skipped.get(code, 0) + 1
            elif len(rows) < max_rows:
                rows.append(r)
        if len(rows) >= max_rows:
            break
    return rows, skipped



def evaluate_shards(model, tokenizer, preprocess, shards: list[Storage], cfg: RetrievalConfig, *, device: torch.device,
                    autocast_dtype: torch.dtype | None = None) -> dict:
    """`evaluate_retrieval` on the first `cfg.max_rows` usable rows of `shards`, with the skipped rows by code; fewer
    than two usable rows is a one-line DataError."""
    rows, skipped = retrieval_rows(shards, cfg.max_rows)
    if len(rows) < 2:
        raise DataError(f"retrieval.shards: {cfg.shards!r}: {len(rows)} usable rows (skipped: {skipped})")
    return {**evaluate_retrieval(model, tokenizer, preprocess, rows, device=device, autocast_dtype=autocast_dtype,
                                 batch_size=cfg.batch_size), "skipped": skipped}


@torch.no_grad()
def evaluate_retrieval(model, tokenizer, preprocess, rows: list[dict], *, device: torch.device,
                       autocast_dtype: torch.dtype | None = None, batch_size: int = 64) -> dict:
    """`rows`: dicts with key, image_bytes, caption. Rows whose image cannot be decoded are listed in `errors`."""
    images, captions, errors = [], [], []
    for r in rows:
        try:
            images.append(preprocess(decode_rgb(r["image_bytes"])))
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
