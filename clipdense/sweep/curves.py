"""Monotone fits of a condition's mean curve in log-fraction, and where a fit first reaches a target (the
data-efficiency factor's estimate: sweep/factor.py says which fit and why). Vectorised over leading axes: y is
[..., F], larger is better.
    power     least squares of a + b*g_c(f), g_c(f) = (f^c - 1)/c (log f at c = 0), b >= 0, c on POWER_GRID;
    isotonic  weighted pool-adjacent-violators, linear in log f between grid points.
"""
from __future__ import annotations

from typing import Literal

import numpy as np

Fit = Literal["power", "isotonic"]
POWER_GRID = np.linspace(-3.0, 1.5, 46)


def isotonic(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted non-decreasing least-squares fit: fit_i = max_{j<=i} min_{k>=i} mean_w(y[j..k]) (= PAVA)."""
    F = y.shape[-1]
    cw, cy = np.cumsum(w, -1), np.cumsum(w * y, -1)
    cw = np.concatenate([np.zeros_like(cw[..., :1]), cw], -1)
    cy = np.concatenate([np.zeros_like(cy[..., :1]), cy], -1)
    j, k = np.meshgrid(np.arange(F), np.arange(F), indexing="ij")
    with np.errstate(invalid="ignore", divide="ignore"):
        m = (cy[..., k + 1] - cy[..., j]) / (cw[k + 1] - cw[j])            # [..., j, k] mean of y[j..k]
    m = np.where(k >= j, m, np.inf)
    upper = np.minimum.accumulate(m[..., ::-1], axis=-1)[..., ::-1]       # min over k >= i, per j: [..., j, i]
    upper = np.where(k >= j, upper, -np.inf)
    return np.max(upper, axis=-2)                                         # max over j <= i


def isotonic_crossing(fit: np.ndarray, x: np.ndarray, target: np.ndarray) -> np.ndarray:
    """log-fraction where the piecewise-linear fit first reaches target; -inf if at x[0] already, +inf never."""
    shape = fit.shape[:-1]
    fit, target = fit.reshape(-1, fit.shape[-1]), np.broadcast_to(target, shape).reshape(-1)
    out = np.full(len(fit), np.inf)
    hit = fit >= target[:, None]
    first = np.where(hit.any(-1), hit.argmax(-1), -1)
    out[first == 0] = -np.inf
    rows = np.nonzero(first > 0)[0]
    i = first[rows]
    lo, hi = fit[rows, i - 1], fit[rows, i]
    t = (target[rows] - lo) / np.where(hi > lo, hi - lo, 1.0)
    out[rows] = x[i - 1] + t * (x[i] - x[i - 1])
    return out.reshape(shape)


def _g(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """(f^c - 1)/c at x = log f; log f where c = 0. Broadcasts c [G, 1] against x [F]."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.expm1(c * x) / c
    return np.where(np.abs(c) < 1e-9, x, out)


def power_fit(y: np.ndarray, w: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a, b, c) of the weighted least-squares a + b*g_c, b >= 0, best c on POWER_GRID; y [..., F]."""
    c = POWER_GRID[:, None]
    gx = _g(x[None, :], c)                                 # [G, F]
    wn = w / w.sum()
    gm = gx @ wn                                           # [G]
    gvar = ((gx - gm[:, None]) ** 2) @ wn                  # [G]
    ym = y @ wn                                            # [...]
    cov = np.einsum("...f,gf,f->...g", y - ym[..., None], gx - gm[:, None], wn)
    b = np.maximum(cov / np.where(gvar > 0, gvar, 1.0), 0.0)
    a = ym[..., None] - b * gm
    resid = y[..., None, :] - (a[..., None] + b[..., None] * gx)
    sse = np.einsum("...gf,f->...g", resid ** 2, wn)
    best = np.argmin(sse, -1)
    take = lambda arr: np.take_along_axis(arr, best[..., None], -1)[..., 0]
    return take(a), take(b), POWER_GRID[best]


def power_value(a, b, c, x):
    return a + b * _g(np.asarray(x, dtype=float), c)


def power_crossing(a, b, c, target, x_min: float, x_max: float) -> np.ndarray:
    """log f where a + b*g_c(f) = target, clipped: -inf below x_min (censored), +inf above x_max (not reached)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        gt = (target - a) / b
        inner = 1.0 + c * gt
        xs = np.where(np.abs(c) < 1e-9, gt, np.log(np.where(inner > 0, inner, np.nan)) / c)
    xs = np.where((np.abs(c) >= 1e-9) & (inner <= 0), np.where(c < 0, np.inf, -np.inf), xs)
    xs = np.where(b <= 0, np.where(a >= target, -np.inf, np.inf), xs)
    xs = np.where(xs <= x_min + 1e-12, -np.inf, xs)
    return np.where(xs > x_max + 1e-12, np.inf, xs)


class FittedCurve:
    """A condition's mean curve (per bootstrap draw; larger is better) and its monotone fit."""

    def __init__(self, means: np.ndarray, weights: np.ndarray, fractions: np.ndarray, fit: Fit):
        self.x = np.log(fractions)
        self.fit = fit
        if fit == "power":
            self.abc = power_fit(means, weights, self.x)
        else:
            self.iso = isotonic(means, weights)

    def at_full(self) -> np.ndarray:
        """The fit at the largest fraction (1 in a full grid)."""
        if self.fit == "power":
            return power_value(*self.abc, self.x[-1])
        return self.iso[..., -1]

    def crossing(self, target: np.ndarray) -> np.ndarray:
        if self.fit == "power":
            return power_crossing(*self.abc, target, self.x[0], self.x[-1])
        return isotonic_crossing(self.iso, self.x, target)
