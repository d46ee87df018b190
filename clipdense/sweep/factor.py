"""Data-efficiency factor: how much less finetuning data backbone B needs to match reference A's full-data metric.

Pure numpy; the report calls it per task. Curves are {fraction: [metric per seed]}.

    target = mean over seeds of A at fraction 1 (its full-data metric)
    f*_B   = the smallest fraction at which B's mean curve reaches target: the first grid point (from the smallest
             fraction up) that matches, log-interpolated with its left neighbour (linear in log f between the two)
    f*_A   = the same for A's own curve: 1 when A still improves up to all the data; below 1 when A's curve is flat
             or falls (noise), so that a reference whose full-data mean sits low cannot inflate the factor
    factor = f*_A / f*_B     ("not reached" -> NaN when no grid point of B matches)

"Matches" respects the metric direction: >= target for higher-is-better (mIoU, mAP), <= for lower-is-better (RMSE).
When B already matches at its smallest fraction, f* is that fraction and the factor is a lower bound (`censored`).
The bootstrap resamples the seeds of every fraction (with replacement) for A and B independently and recomputes the
factor; a resample that does not reach counts as factor 0 (needs more than all the data), so percentiles stay ordered,
and `not_reached_frac` says how often that happened.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np

Curve = Mapping[float, Sequence[float]]


@dataclass
class Factor:
    factor: float                 # 1 / f*, NaN when not reached
    fraction: float               # f*, NaN when not reached
    reached: bool
    censored: bool                # B matched already at its smallest fraction: factor is a lower bound
    target: float                 # A's full-data mean
    ci_low: float = math.nan
    ci_high: float = math.nan
    not_reached_frac: float = math.nan   # share of bootstrap samples in which B never matched
    n_bootstrap: int = 0
    reference_fraction: float = 1.0      # f*_A: where A's own curve first reaches its full-data mean

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def _matches(value: float, target: float, higher_is_better: bool) -> bool:
    return value >= target if higher_is_better else value <= target


def crossing_fraction(fractions: Sequence[float], means: Sequence[float], target: float,
                      higher_is_better: bool = True) -> tuple[float, bool]:
    """(f*, censored) for a mean curve given at increasing `fractions`; (NaN, False) when never reached."""
    fr = np.asarray(fractions, dtype=float)
    m = np.asarray(means, dtype=float)
    if fr.ndim != 1 or fr.shape != m.shape or len(fr) == 0:
        raise ValueError("fractions and means must be 1-D and of equal, non-zero length")
    if np.any(np.diff(fr) <= 0) or np.any(fr <= 0):
        raise ValueError("fractions must be positive and strictly increasing")
    for i in range(len(fr)):
        if not np.isfinite(m[i]) or not _matches(m[i], target, higher_is_better):
            continue
        if i == 0:
            return float(fr[0]), True
        lo, hi = m[i - 1], m[i]
        if not np.isfinite(lo) or hi == lo:
            return float(fr[i]), False
        t = (target - lo) / (hi - lo)          # in (0, 1]: lo does not match, hi does
        log_f = math.log(fr[i - 1]) + t * (math.log(fr[i]) - math.log(fr[i - 1]))
        return float(math.exp(log_f)), False
    return math.nan, False


def _sorted(curve: Curve) -> tuple[np.ndarray, list[np.ndarray]]:
    fractions = sorted(float(f) for f in curve)
    values = [np.asarray([v for v in curve[f] if v is not None and np.isfinite(v)], dtype=float)
              for f in sorted(curve, key=float)]
    return np.asarray(fractions), values


def _point(fr: np.ndarray, b_values: list[np.ndarray], target: float, hib: bool) -> tuple[float, bool]:
    means = [v.mean() if len(v) else math.nan for v in b_values]
    return crossing_fraction(fr, means, target, hib)


def full_data_target(reference: Curve) -> float:
    """Mean over seeds of the reference at fraction 1."""
    for f, values in reference.items():
        if math.isclose(float(f), 1.0):
            vals = [v for v in values if v is not None and np.isfinite(v)]
            if vals:
                return float(np.mean(vals))
    return math.nan


def _resample(rng: np.random.Generator, values: list[np.ndarray]) -> list[np.ndarray]:
    """Every fraction's seeds drawn with replacement (empty fractions stay empty)."""
    return [rng.choice(v, size=len(v), replace=True) if len(v) else v for v in values]


def _own_fraction(fr_a: np.ndarray, a_values: list[np.ndarray], target: float, hib: bool) -> float:
    f, _ = _point(fr_a, a_values, target, hib)
    return f if np.isfinite(f) else 1.0  # A reaches its own full-data mean at 1 by definition


def efficiency_factor(reference: Curve, candidate: Curve, higher_is_better: bool = True, *,
                      n_bootstrap: int = 1000, ci: float = 0.95, seed: int = 0) -> Factor:
    """Factor of `candidate` (B) against `reference` (A), with a seed-bootstrap percentile CI."""
    target = full_data_target(reference)
    fr, b_values = _sorted(candidate)
    if not np.isfinite(target) or len(fr) == 0:
        return Factor(math.nan, math.nan, False, False, target)
    fr_a, a_values = _sorted(reference)
    f_a = _own_fraction(fr_a, a_values, target, higher_is_better)
    f_star, censored = _point(fr, b_values, target, higher_is_better)
    reached = bool(np.isfinite(f_star))
    out = Factor(f_a / f_star if reached else math.nan, f_star, reached, censored, target, reference_fraction=f_a)
    if n_bootstrap <= 0:
        return out
    rng = np.random.default_rng(seed)
    full = next(i for i, f in enumerate(fr_a) if math.isclose(f, 1.0))
    factors = np.empty(n_bootstrap)
    for b in range(n_bootstrap):
        a_re = _resample(rng, a_values)
        t = a_re[full].mean()
        f_b, _ = _point(fr, _resample(rng, b_values), t, higher_is_better)
        # not reached: needs more than all the data
        factors[b] = _own_fraction(fr_a, a_re, t, higher_is_better) / f_b if np.isfinite(f_b) else 0.0
    alpha = (1.0 - ci) / 2.0
    out.ci_low, out.ci_high = (float(x) for x in np.percentile(factors, [100 * alpha, 100 * (1 - alpha)]))
    out.not_reached_frac = float(np.mean(factors == 0.0))
    out.n_bootstrap = n_bootstrap
    return out


def fraction_deltas(reference: Curve, candidate: Curve, higher_is_better: bool = True) -> list[dict]:
    """At every fraction both curves have: mean(B) - mean(A), signed so that > 0 means B is better."""
    a, b = (dict(zip(*_sorted(c))) for c in (reference, candidate))
    out = []
    for f in sorted(a.keys() & b.keys()):
        if len(a[f]) and len(b[f]):
            d = float(b[f].mean() - a[f].mean())
            out.append({"fraction": float(f), "delta": d if higher_is_better else -d})
    return out
