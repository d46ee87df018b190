"""Caption quality stats, written to `<output>/_stats.json`.

- caption length in words: mean, min, max, percentiles (5/25/50/75/95);
- distinct-1 / distinct-2: distinct n-grams / total n-grams over all captions (corpus level);
- per-image diversity: mean number of different captions among an image's N;
- optionally (stats.clip_model) the mean CLIP score over a sample: 100 * max(cos(image, caption), 0), i.e.
  CLIPScore without its w = 2.5 rescaling; synthetic and original captions are scored alike.
Stats are computed from the output files (every shard of the input, including ones done by earlier runs, whose
files may be in an older version's format: `error` string alone), with the rows read counted by error code.
"""
from __future__ import annotations

import json
import re
from typing import Sequence

import numpy as np
import pyarrow.parquet as pq

from clipdense.data.rows import codes_of, count_codes
from clipdense.data.storage import Storage

_WORD = re.compile(r"[\w']+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams / total n-grams over all texts (0.0 when there are none)."""
    seen, total = set(), 0
    for t in texts:
        w = words(t)
        grams = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


def text_stats(texts: Sequence[str]) -> dict:
    lengths = np.array([len(words(t)) for t in texts], dtype=np.float64)
    if lengths.size == 0:
        return {"count": 0}
    pct = np.percentile(lengths, [5, 25, 50, 75, 95])
    return {"count": int(lengths.size), "words_mean": round(float(lengths.mean()), 3),
            "words_min": int(lengths.min()), "words_max": int(lengths.max()),
            "words_percentiles": {f"p{p}": round(float(v), 2) for p, v in zip((5, 25, 50, 75, 95), pct)},
            "empty": int((lengths == 0).sum()),
            "distinct_1": round(distinct_n(texts, 1), 4), "distinct_2": round(distinct_n(texts, 2), 4)}


def caption_stats(syn: Sequence[Sequence[str]], orig: Sequence[str]) -> dict:
    flat = [c for caps in syn for c in caps]
    per_image = [len(set(caps)) for caps in syn]
    return {"synthetic": {**text_stats(flat),
                          "unique_per_image_mean": round(float(np.mean(per_image)), 3) if per_image else 0.0},
            "original": text_stats([c for c in orig if c])}


def clip_scores(model_name: str, pretrained: str | None, images: list, texts: list[list[str]],
                device: str = "cpu", batch_size: int = 64) -> list[float]:
    """Mean over each image's texts of 100 * max(cos, 0), per image."""
    import torch

    from clipdense.models.registry import create_clip_and_transforms, tokenizer_for

    model, _, preprocess = create_clip_and_transforms(model_name, pretrained=pretrained)
    model = model.to(device).eval()
    tokenizer = tokenizer_for(model_name)
    out = []
    with torch.no_grad():
        for s in range(0, len(images), batch_size):
            ims, txts = images[s:s + batch_size], texts[s:s + batch_size]
            x = torch.stack([preprocess(im) for im in ims]).to(device)
            img = torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1)
            flat = [t for ts in txts for t in ts]
            txt = torch.nn.functional.normalize(model.encode_text(tokenizer(flat).to(device)).float(), dim=-1)
            owner = torch.tensor([i for i, ts in enumerate(txts) for _ in ts], device=device)
            cos = (img[owner] * txt).sum(-1).clamp(min=0) * 100
            for i in range(len(ims)):
                out.append(float(cos[owner == i].mean()))
    return out


def _read_outputs(files: list[Storage], max_rows: int) -> dict[str, list]:
    """key, caption, syn_captions and `error_code` (None: captioned) of the output files, either format."""
    cols = {"key": [], "caption": [], "syn_captions": [], "error_code": []}
    for p in files:
        fs, inner = p.locate()
        present = set(pq.read_schema(inner, filesystem=fs).names)
        t = pq.read_table(inner, columns=[c for c in (*cols, "error") if c in present], filesystem=fs)
        for c in ("key", "caption", "syn_captions"):
            cols[c] += t.column(c).to_pylist()
        cols["error_code"] += codes_of(t)
        if len(cols["key"]) >= max_rows:
            break
    return {c: v[:max_rows] for c, v in cols.items()}


def _sample_images(inputs: list[Storage], keys: set[str], limit: int) -> dict[str, bytes]:
    from clipdense.data.shards import read_shard_local

    found: dict[str, bytes] = {}
    for file in inputs:
        if file.uri.endswith(".tar"):
            rows = read_shard_local(file, validate="none")
        else:
            fs, inner = file.locate()
            rows = pq.read_table(inner, columns=["key", "image_bytes"], filesystem=fs).to_pylist()
        for r in rows:
            if r["key"] in keys and r.get("image_bytes"):
                found[r["key"]] = r["image_bytes"]
                if len(found) >= limit:
                    return found
    return found


def clip_section(cfg, plan, data: dict[str, list]) -> dict:
    import torch

    from clipdense.data.images import ImageError, decode_rgb

    st = cfg.stats
    ok = {k: (c, s) for k, c, s, e in zip(data["key"], data["caption"], data["syn_captions"], data["error_code"])
          if e is None and s}
    images = _sample_images([cfg.storage(p) for p in plan.inputs.values()], set(ok), st.clip_sample)
    keys, pils = [], []
    for k, blob in images.items():
        try:
            pils.append(decode_rgb(blob, cfg.decode.max_image_pixels))
            keys.append(k)
        except ImageError:  # the same key in another input shard may hold other bytes: skip, don't crash
            continue
    device = "cuda" if st.device == "cuda" or (st.device == "auto" and torch.cuda.is_available()) else "cpu"
    syn = clip_scores(st.clip_model, st.clip_pretrained, pils, [ok[k][1] for k in keys], device)
    with_alt = [i for i, k in enumerate(keys) if ok[k][0]]  # images without alt text are recaptioned too
    orig = clip_scores(st.clip_model, st.clip_pretrained, [pils[i] for i in with_alt],
                       [[ok[keys[i]][0]] for i in with_alt], device) if with_alt else []
    return {"clip_model": st.clip_model, "clip_pretrained": st.clip_pretrained, "images": len(keys),
            "clip_score_synthetic": round(float(np.mean(syn)), 3) if syn else None,
            "clip_score_original": round(float(np.mean(orig)), 3) if orig else None}


def write_stats(cfg, plan) -> dict:
    """Compute the stats over the outputs of `plan` and write `<output>/_stats.json`; returns them."""
    from clipdense.recaption.writer import existing_files

    present = existing_files(cfg.storage(cfg.output))
    paths = [p for n, p in plan.outputs.items() if f"{n}.parquet" in present]
    data = _read_outputs(paths, cfg.stats.max_rows)
    ok = [i for i, e in enumerate(data["error_code"]) if e is None]
    stats = {"shards": len(paths), "rows_read": len(data["key"]), "rows_captioned": len(ok),
             "rows_failed_by_code": count_codes(data["error_code"])[1],
             **caption_stats([data["syn_captions"][i] or [] for i in ok], [data["caption"][i] for i in ok])}
    if cfg.stats.clip_model and ok:
        stats["clip"] = clip_section(cfg, plan, data)
    path = f"{cfg.output.rstrip('/')}/_stats.json"
    fs, inner = cfg.storage(path).locate()
    fs.create_dir(inner.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(inner) as f:
        f.write(json.dumps(stats, indent=2).encode())
    return {"path": path, **stats}
