"""The CLIP-score summary of a recaption run with teachers: the distribution of each caption's score per source (alt
text vs synthetic) as quantiles (`<output>/_scores.json`) and a histogram (`<output>/_scores.png`). Scores are the
scorer teacher's cosine of image and caption (teacher_forward.py), read back from the Parquet outputs."""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq

from clipdense.data.storage import Storage

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def read_scores(files: list[Storage]) -> dict[str, np.ndarray]:
    """{"alt_text": every caption_score, "synthetic": every syn_scores entry} of the outputs that carry them."""
    alt, syn = [], []
    for file in files:
        with file.open_input_file() as f:
            pf = pq.ParquetFile(f)
            if "syn_scores" not in pf.schema_arrow.names:
                continue
            t = pf.read(columns=["caption_score", "syn_scores"])
        alt += [s for s in t.column("caption_score").to_pylist() if s is not None]
        syn += [s for ss in t.column("syn_scores").to_pylist() if ss for s in ss]
    return {"alt_text": np.asarray(alt, np.float64), "synthetic": np.asarray(syn, np.float64)}


def quantiles(values: np.ndarray) -> dict:
    if values.size == 0:
        return {"count": 0}
    q = np.quantile(values, QUANTILES)
    return {"count": int(values.size), "mean": round(float(values.mean()), 4),
            **{f"p{int(p * 100)}": round(float(v), 4) for p, v in zip(QUANTILES, q)}}


def histogram_png(scores: dict[str, np.ndarray]) -> bytes:
    from matplotlib.figure import Figure  # Agg canvas, no global pyplot state; matplotlib only where plotted

    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    present = [v for v in scores.values() if v.size]
    lo, hi = (min(v.min() for v in present), max(v.max() for v in present)) if present else (-1.0, 1.0)
    bins = np.linspace(lo, hi if hi > lo else lo + 1e-3, 41)
    for name, values in scores.items():
        if values.size:
            ax.hist(values, bins=bins, alpha=0.55, label=f"{name} (n={values.size})", density=True)
    ax.set_xlabel("CLIP score (cosine of image and caption)")
    ax.set_ylabel("density")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def write_score_summary(files: list[Storage], output: Storage) -> dict | None:
    """Write `_scores.json` (quantiles per source) and `_scores.png`; None when no output carries scores."""
    scores = read_scores(files)
    if not any(v.size for v in scores.values()):
        return None
    summary = {name: quantiles(v) for name, v in scores.items()}
    with output.child("_scores.json").open_output_stream() as f:
        f.write(json.dumps(summary, indent=2).encode())
    with output.child("_scores.png").open_output_stream() as f:
        f.write(histogram_png(scores))
    return {"json": output.child("_scores.json").uri, "png": output.child("_scores.png").uri, **summary}
