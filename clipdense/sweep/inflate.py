"""Residual inflation before the factor's Bayesian bootstrap (sweep/factor.py): seed residuals and run residuals
scaled so a Dirichlet(1) resample has the unbiased variance of the mean; runs rescaled to the pooled run variance,
paired or not.
"""
from __future__ import annotations

import math

import numpy as np

from clipdense.sweep.conditions import Data, RunPool, nanmean, run_means


def inflate_seeds(d: Data) -> Data:
    """Residuals around the seed mean (per run, fraction) scaled by sqrt((n+1)/(n-1)), so a Dirichlet(1) resample
    of n values has the unbiased variance of their mean; one seed (no variance) stays as it is."""
    v = d.values
    n = np.isfinite(v).sum(-1, keepdims=True)
    m = nanmean(v, -1)                                                      # [R, F, 1]
    return Data(m + (v - m) * np.sqrt(np.where(n > 1, (n + 1) / np.maximum(n - 1, 1), 1.0)), d.fractions, d.seeds)


def _run_residuals(d: Data) -> tuple[np.ndarray, np.ndarray]:
    """([R, F] run means' residuals around the condition mean (0 where missing), [F] runs present)."""
    m = run_means(d)
    ok = np.isfinite(m)
    return np.where(ok, m - nanmean(m, 0), 0.0), ok.sum(0)


def _shift_runs(d: Data, new_resid: np.ndarray, old_resid: np.ndarray) -> Data:
    """Move each run's values (all its seeds) so its residual becomes `new_resid` [R, F]."""
    return Data(d.values + (new_resid - old_resid)[..., None], d.fractions, d.seeds)


def inflate(d: Data, pooled_var: np.ndarray | None = None) -> Data:
    """Seeds inflated (`inflate_seeds`); the run means' residuals rescaled to the pooled run variance
    (`pooled_var` [F]; NaN or None: the condition's own) and by sqrt((R+1)/(R-1)), so a Dirichlet(1) resample of
    the runs has variance pooled / R. Zero variance (identical runs) stays zero: nothing to rescale, no division."""
    d = inflate_seeds(d)
    if d.values.shape[0] < 2:
        return d
    resid, nr = _run_residuals(d)
    own = (resid ** 2).sum(0) / np.maximum(nr - 1, 1)                        # [F]
    want = own if pooled_var is None else np.where(np.isfinite(pooled_var), pooled_var, own)
    ratio = np.where(own > 0, want / np.where(own > 0, own, 1.0), 1.0)
    k = np.sqrt(np.where(nr > 1, ratio * (nr + 1) / np.maximum(nr - 1, 1), 1.0))
    return _shift_runs(d, resid * k, resid)


def inflate_paired(a: Data, b: Data, pool: RunPool) -> tuple[Data, Data]:
    """Paired runs (R each): at each shared fraction the run residuals split into a common part (e_A + e_B)/2 and
    the difference e_B - e_A; the difference is rescaled to twice the pooled two-way variance (its expectation
    when the replicate effect is removed), both by sqrt((R+1)/(R-1)). Fractions one condition lacks: own."""
    a, b = inflate(a), inflate(b)                                          # seeds, and runs at unshared fractions
    if a.values.shape[0] < 2:
        return a, b
    ra, _ = _run_residuals(a)
    rb, _ = _run_residuals(b)
    R = a.values.shape[0]
    new_a, new_b = ra.copy(), rb.copy()
    for jb, f in enumerate(b.fractions):
        ja = np.nonzero(np.isclose(a.fractions, f))[0]
        var = pool.variance(np.asarray([f]))[0]
        if not len(ja) or not math.isfinite(var):
            continue
        ea, eb = ra[:, ja[0]], rb[:, jb]
        common, diff = (ea + eb) / 2, eb - ea
        s_d = float((diff ** 2).sum() / (R - 1))
        kd = math.sqrt(2 * var * (R + 1) / (R - 1) / s_d) if s_d > 0 else 1.0   # s_d is already inflated
        new_a[:, ja[0]], new_b[:, jb] = common - kd * diff / 2, common + kd * diff / 2
    return _shift_runs(a, new_a, ra), _shift_runs(b, new_b, rb)
