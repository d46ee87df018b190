"""Caption quality stats, written to `<output>/_stats.json`.

- caption length in words: mean, min, max, percentiles (5/25/50/75/95);
- distinct-1 / distinct-2: distinct n-grams / total n-grams over all captions (corpus level);
- per-image diversity: mean number of different captions among an image's N;
- optionally (stats.clip_model) the mean CLIP score over a sample (clip_score.py); synthetic and original captions
  are scored alike;
- with teachers, every caption's stored score as quantiles per source + a histogram (scores.py).
Stats are computed from the output files (every shard of the input, including ones done by earlier runs, whose
files may be in an older version's format: `error` string alone), with the rows read counted by error code.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from typing import Sequence

import numpy as np
import pyarrow.parquet as pq

from clipdense.data.paths import ShardFiles
from clipdense.data.rows import codes_of
from clipdense.data.storage import Storage
from clipdense.data.tar_rows import sample_images
from clipdense.recaption.config import StatsConfig
from clipdense.recaption.plan import Plan
from clipdense.recaption.scores import write_score_summary

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


def _read_outputs(files: list[Storage], max_rows: int) -> dict[str, list]:
    """key, caption, syn_captions and `error_code` (None: captioned) of the output files, either format."""
    cols = {"key": [], "caption": [], "syn_captions": [], "error_code": []}
    for file in files:
        with file.open_input_file() as f:
            pf = pq.ParquetFile(f)
            t = pf.read(columns=[c for c in (*cols, "error") if c in pf.schema_arrow.names])
        for c in ("key", "caption", "syn_captions"):
            cols[c] += t.column(c).to_pylist()
        cols["error_code"] += codes_of(t)
        if len(cols["key"]) >= max_rows:
            break
    return {c: v[:max_rows] for c, v in cols.items()}


def write_stats(plan: Plan, output: Storage, shards: ShardFiles, st: StatsConfig, max_image_pixels: int) -> dict:
    """Compute the stats over the output files of `plan` (in `output`) and write `<output>/_stats.json`; returns
    them. The optional CLIP score samples images of the input `shards`."""
    present = output.file_names()
    files = [f for n, f in plan.outputs.items() if f"{n}.parquet" in present]
    data = _read_outputs(files, st.max_rows)
    ok = [i for i, e in enumerate(data["error_code"]) if e is None]
    captions = caption_stats([data["syn_captions"][i] or [] for i in ok], [data["caption"][i] for i in ok])
    failed = Counter(e for e in data["error_code"] if e is not None)
    stats = {"shards": len(files), "rows_read": len(data["key"]), "rows_captioned": len(ok),
             "rows_failed_by_code": dict(sorted(failed.items())), **captions}
    if st.clip_model and ok:
        rows = {data["key"][i]: (data["caption"][i], data["syn_captions"][i]) for i in ok if data["syn_captions"][i]}
        images = sample_images(shards, set(rows), st.clip_sample, max_image_pixels)
        # local: CLIP scoring imports torch and open_clip, which the vllm actors' venv (importing this package) lacks
        from clipdense.recaption.clip_score import clip_section

        stats["clip"] = clip_section(st, images, rows)
    scores = write_score_summary(files, output)  # with teachers: each caption's CLIP score, per source
    if scores is not None:
        stats["scores"] = scores
    dest = output.child("_stats.json")
    with dest.open_output_stream() as f:
        f.write(json.dumps(stats, indent=2).encode())
    return {"path": dest.uri, **stats}
