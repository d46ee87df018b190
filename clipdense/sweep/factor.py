"""Data-efficiency factor: how much less finetuning data candidate B needs to match reference A, with an interval.

Pure numpy; the report calls `compare` per task. A curve is `{fraction: [value per seed]}` (list position = seed)
or `{fraction: {seed: value}}`; a condition with several pretraining runs is a list of curves (one per run).

Estimate (per target):
    fit     each condition's mean curve (seeds averaged per run, runs averaged) gets a monotone fit in log-fraction:
            `power` (default), least squares of a + b*g_c(f) with g_c(f) = (f^c - 1)/c (log f at c = 0), b >= 0,
            c on a grid in [-3, 1.5]: a power law that saturates (c < 0), is linear in log f (c = 0) or
            accelerates. `isotonic`: weighted pool-adjacent-violators, linear in log f between grid points
            (model-free, noisier). Weights per fraction: its seed count (`weights="seeds"`, the default) or
            1 / the variance of the condition's mean there (`"inverse-variance"`: seed variance / trials + pooled
            run variance / runs; an exact full-data point then anchors the fit). Not validated: its interval
            under-covers in bench/factor_sim.py (down to 0.79, the weights being estimated from few seeds), so
            the report keeps seed counts; it shows how much the fit's full-data end costs (bench/factor_power.py).
    target  level x the reference's fitted full-data score (at its largest fraction, 1 in a full grid);
            direction-aware: for lower-is-better metrics the target is (2 - level) x the score, e.g. RMSE x 1.05
            at level 0.95. Levels 1 and 0.95 by default.
    f*      where a fit first reaches the target, inside the measured fractions; f*_A for the reference itself.
    factor  f*_A / f*_B. Censored when B's fit is already past the target at its smallest fraction f_min:
            factor >= f*_A / f_min. Not reached when B's fit does not reach the target by its largest
            fraction f_max: factor < f*_A / f_max.
In simulation (bench/factor_sim.py, `--fit`) both fits gave similar median errors (neither uniformly better, within
~0.03) and coverage >= 0.92; power is the default because its crossing uses every fraction, not only the two around
it, while isotonic assumes nothing but monotonicity.
Interval: a paired Bayesian bootstrap of whole seed curves, at two levels.
    seeds   each draw gives every finetuning seed a Dirichlet(1) weight, shared by all fractions, runs and both
            conditions (a seed's data subset is the same everywhere); a fraction uses the weights of the seeds it
            has, renormalised (so fractions with more seeds resample within the fraction and pair where seeds
            are shared). Residuals around each run's seed mean are scaled by sqrt((n+1)/(n-1)), n = seeds there,
            so the resampled mean has the unbiased variance; one seed (the full-data fraction, where every seed
            uses the whole set) has none and stays fixed.
    runs    with several pretraining runs, each draw gives run index r one Dirichlet(1) weight shared by both
            conditions when they have the same number of runs (paired: replicate r of every condition shares its
            pretraining seed, so an effect of that seed cancels; `runs_paired: true`); with different run counts
            (or `pair_runs=False`) each condition draws its own. The run means' residuals around each condition's
            mean are then rescaled per fraction to a pooled run variance and by sqrt((R+1)/(R-1)):
            paired: the residuals split into a common part (e_A + e_B)/2, kept, and the difference e_B - e_A,
            rescaled to 2 s_p^2, s_p^2 = the variance of the two-way residuals m[c,r] - m[c,.] - m[.,r] + m[.,.]
            (replicate effect removed) over both conditions and those of `pool` with the same run count, df =
            (conditions - 1)(runs - 1). Pairing estimates the replicate effect, so it costs df: with two
            conditions alone it is the paired difference's runs - 1.
            unpaired: each condition's residuals rescaled to s_p^2 = sum_c SS_c / sum_c (runs_c - 1) over both
            conditions and `pool`, df = sum_c (runs_c - 1).
            The report passes the task's other conditions as `pool`. A condition whose runs coincide at a
            fraction keeps zero there (nothing to rescale, no division); a single run has no run level (with one
            run against several, only the several are resampled).
    t       the percentile interval of log(factor) is widened around the estimate by t(df)/z: the small-sample
            correction a few-value bootstrap lacks. df = the run pool's (above) when either condition has several
            runs; else the fewest seeds at any fraction - 1 (a full-data fraction with one seed left out).
A censored draw counts as +inf, a not-reached one as -inf, so an interval end that falls among them is open
(">= x", "< x"). `compare` also returns each condition's run SD before pooling (`run_sd`: per fraction, the SD
across runs of the run's seed mean, which includes that mean's seed noise) and the pooled one. Validated by
simulation: `bench/factor_sim.py` (coverage and error table in docs/sweeps-and-report.md), its power for the demo's
preset `bench/factor_power.py`, and `tests/test_sweep_factor.py`.
"""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from typing import Literal, Mapping, Sequence, Union

import numpy as np

Curve = Mapping[float, Union[Sequence[float], Mapping[int, float]]]
Condition = Union[Curve, Sequence[Curve]]          # one curve, or one per pretraining run
Fit = Literal["power", "isotonic"]
Weighting = Literal["seeds", "inverse-variance"]
POWER_GRID = np.linspace(-3.0, 1.5, 46)
# the defaults `compare` and the report settings (sweep/config.py ReportSettings) share
DEFAULT_TARGETS = (1.0, 0.95)
DEFAULT_N_BOOTSTRAP = 2000
DEFAULT_CI = 0.95
DEFAULT_FIT: Fit = "power"


@dataclass
class Factor:
    factor: float                 # f*_A / f*_B; the bound when censored (>=) or not reached (<)
    fraction: float               # f*_B (f_min when censored, NaN when not reached)
    reached: bool
    censored: bool                # B's fit is past the target at its smallest fraction: factor >= `factor`
    target: float
    level: float = 1.0            # target = level x the reference's full-data score (direction-aware)
    reference_fraction: float = 1.0     # f*_A
    ci_low: float = math.nan
    ci_high: float = math.nan
    ci_low_open: bool = False     # ci_low is a bound: the interval reaches below what the grid can show ("< x")
    ci_high_open: bool = False    # ci_high is a bound: the interval reaches above it (">= x")
    ci: float = DEFAULT_CI
    censored_frac: float = math.nan      # share of bootstrap draws censored
    not_reached_frac: float = math.nan   # share of bootstrap draws not reached
    n_bootstrap: int = 0
    df: int = 0
    fit: str = DEFAULT_FIT

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


@dataclass
class Data:
    """One condition as arrays: values [R, F, S] (NaN = no trial), fractions [F], seeds [S]."""
    values: np.ndarray
    fractions: np.ndarray
    seeds: list = field(default_factory=list)


def _runs(cond: Condition) -> list[Curve]:
    return [cond] if isinstance(cond, Mapping) else list(cond)


def as_data(cond: Condition, seeds: list | None = None) -> Data:
    runs = _runs(cond)
    if not runs:
        raise ValueError("a condition needs at least one curve")
    per_run = []
    for curve in runs:
        pts = {}
        for f, vals in curve.items():
            items = vals.items() if isinstance(vals, Mapping) else enumerate(vals)
            pts[float(f)] = {s: float(v) for s, v in items if v is not None and np.isfinite(v)}
        per_run.append(pts)
    fractions = sorted({f for pts in per_run for f, d in pts.items() if d})
    if seeds is None:
        seeds = sorted({s for pts in per_run for d in pts.values() for s in d}, key=str)
    values = np.full((len(runs), len(fractions), len(seeds)), np.nan)
    index = {s: i for i, s in enumerate(seeds)}
    for r, pts in enumerate(per_run):
        for j, f in enumerate(fractions):
            for s, v in pts.get(f, {}).items():
                values[r, j, index[s]] = v
    fr = np.asarray(fractions)
    if np.any(fr <= 0):
        raise ValueError("fractions must be positive")
    return Data(values, fr, list(seeds))


# ---- monotone fits (vectorised over leading axes; y: [..., F], increasing is better) ----

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


def _isotonic_crossing(fit: np.ndarray, x: np.ndarray, target: np.ndarray) -> np.ndarray:
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


def _power_value(a, b, c, x):
    return a + b * _g(np.asarray(x, dtype=float), c)


def _power_crossing(a, b, c, target, x_min: float, x_max: float) -> np.ndarray:
    """log f where a + b*g_c(f) = target, clipped: -inf below x_min (censored), +inf above x_max (not reached)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        gt = (target - a) / b
        inner = 1.0 + c * gt
        xs = np.where(np.abs(c) < 1e-9, gt, np.log(np.where(inner > 0, inner, np.nan)) / c)
    xs = np.where((np.abs(c) >= 1e-9) & (inner <= 0), np.where(c < 0, np.inf, -np.inf), xs)
    xs = np.where(b <= 0, np.where(a >= target, -np.inf, np.inf), xs)
    xs = np.where(xs <= x_min + 1e-12, -np.inf, xs)
    return np.where(xs > x_max + 1e-12, np.inf, xs)


class _Fitted:
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
            return _power_value(*self.abc, self.x[-1])
        return self.iso[..., -1]

    def crossing(self, target: np.ndarray) -> np.ndarray:
        if self.fit == "power":
            return _power_crossing(*self.abc, target, self.x[0], self.x[-1])
        return _isotonic_crossing(self.iso, self.x, target)


def _means(d: Data, seed_w: np.ndarray | None, run_w: np.ndarray | None) -> np.ndarray:
    """[B, F] (or [F]) condition means: seed-weighted per run and fraction, then run-weighted."""
    present = np.isfinite(d.values)
    v = np.where(present, d.values, 0.0)
    if seed_w is None:
        per_run = v.sum(-1) / np.maximum(present.sum(-1), 1)                 # [R, F]
        ok = present.any(-1)
        return (per_run * ok).sum(0) / np.maximum(ok.sum(0), 1)
    sw = seed_w[:, None, None, :] * present                                  # [B, R, F, S]
    per_run = (sw * v).sum(-1) / np.maximum(sw.sum(-1), 1e-300)              # [B, R, F]
    ok = present.any(-1)                                                     # [R, F]
    rw = run_w[:, :, None] * ok                                              # [B, R, F]
    return (rw * per_run).sum(1) / np.maximum(rw.sum(1), 1e-300)


def _nanmean(v: np.ndarray, axis: int) -> np.ndarray:
    ok = np.isfinite(v)
    return np.where(ok, v, 0.0).sum(axis, keepdims=True) / np.maximum(ok.sum(axis, keepdims=True), 1)


def _run_means(d: Data) -> np.ndarray:
    """[R, F] each run's mean over its seeds at each fraction (NaN where the run lacks the fraction)."""
    present = np.isfinite(d.values)
    with np.errstate(invalid="ignore"):
        return np.where(present, d.values, 0.0).sum(-1) / np.where(present.any(-1), present.sum(-1), np.nan)


def _run_ss(d: Data) -> tuple[np.ndarray, np.ndarray]:
    """([F] sum of squared deviations of the run means from their mean, [F] runs at the fraction - 1)."""
    m = _run_means(d)
    ok = np.isfinite(m)
    dev = np.where(ok, m - _nanmean(m, 0), 0.0)
    return (dev ** 2).sum(0), np.maximum(ok.sum(0) - 1, 0)


def run_sd(cond: Condition | Data) -> dict[float, float]:
    """{fraction: SD (ddof 1) across a condition's pretraining runs of each run's mean over its finetuning seeds}
    (the seed mean's own noise included); NaN where fewer than two runs have the fraction."""
    d = cond if isinstance(cond, Data) else as_data(cond)
    ss, dof = _run_ss(d)
    with np.errstate(invalid="ignore", divide="ignore"):
        sd = np.where(dof > 0, np.sqrt(ss / np.maximum(dof, 1)), np.nan)
    return {float(f): float(x) for f, x in zip(d.fractions, sd)}


@dataclass
class RunPool:
    """Pretraining-run variance pooled across conditions, per fraction: sum(SS) / sum(df).
    unpaired: SS of each condition's run means around its mean, df = sum over conditions of (runs - 1).
    paired (every member has R runs, run r of each sharing its pretraining seed): the two-way residuals
    m[c, r] - m[c, .] - m[., r] + m[., .] (the replicate effect removed), df = (conditions - 1)(R - 1)."""
    ss: dict = field(default_factory=dict)       # fraction key -> [sum of SS, sum of df]
    df: int = 0
    paired: bool = False

    @classmethod
    def of(cls, conditions: Sequence[Data], paired: bool = False) -> "RunPool":
        pool = cls(paired=paired)
        if paired:
            members = [d for d in conditions if d.values.shape[0] == conditions[0].values.shape[0]]
            pool.df = (len(members) - 1) * (members[0].values.shape[0] - 1)
            by_fraction: dict = {}
            for d in members:
                for f, m in zip(d.fractions, _run_means(d).T):
                    if np.all(np.isfinite(m)):
                        by_fraction.setdefault(_key(f), []).append(m)
            for key, rows in by_fraction.items():
                m = np.asarray(rows)                                          # [C, R]
                e = m - m.mean(1, keepdims=True) - m.mean(0, keepdims=True) + m.mean()
                pool.ss[key] = [float((e ** 2).sum()), (len(m) - 1) * (m.shape[1] - 1)]
            return pool
        for d in conditions:
            pool.df += d.values.shape[0] - 1
            for f, ss, dof in zip(d.fractions, *_run_ss(d)):
                acc = pool.ss.setdefault(_key(f), [0.0, 0])
                acc[0], acc[1] = acc[0] + float(ss), acc[1] + int(dof)
        return pool

    def variance(self, fractions: np.ndarray) -> np.ndarray:
        """[F] pooled run variance at each fraction; NaN where no condition has two runs there."""
        acc = [self.ss.get(_key(f), [0.0, 0]) for f in fractions]
        return np.asarray([ss / dof if dof > 0 else math.nan for ss, dof in acc])

    def sd(self, fractions: np.ndarray) -> dict[float, float]:
        return {float(f): float(math.sqrt(v)) for f, v in zip(fractions, self.variance(fractions))}


def _key(f: float) -> str:
    return format(float(f), ".9g")


def _inflate_seeds(d: Data) -> Data:
    """Residuals around the seed mean (per run, fraction) scaled by sqrt((n+1)/(n-1)), so a Dirichlet(1) resample
    of n values has the unbiased variance of their mean; one seed (no variance) stays as it is."""
    v = d.values
    n = np.isfinite(v).sum(-1, keepdims=True)
    m = _nanmean(v, -1)                                                      # [R, F, 1]
    return Data(m + (v - m) * np.sqrt(np.where(n > 1, (n + 1) / np.maximum(n - 1, 1), 1.0)), d.fractions, d.seeds)


def _run_residuals(d: Data) -> tuple[np.ndarray, np.ndarray]:
    """([R, F] run means' residuals around the condition mean (0 where missing), [F] runs present)."""
    m = _run_means(d)
    ok = np.isfinite(m)
    return np.where(ok, m - _nanmean(m, 0), 0.0), ok.sum(0)


def _shift_runs(d: Data, new_resid: np.ndarray, old_resid: np.ndarray) -> Data:
    """Move each run's values (all its seeds) so its residual becomes `new_resid` [R, F]."""
    return Data(d.values + (new_resid - old_resid)[..., None], d.fractions, d.seeds)


def _inflate(d: Data, pooled_var: np.ndarray | None = None) -> Data:
    """Seeds inflated (`_inflate_seeds`); the run means' residuals rescaled to the pooled run variance
    (`pooled_var` [F]; NaN or None: the condition's own) and by sqrt((R+1)/(R-1)), so a Dirichlet(1) resample of
    the runs has variance pooled / R. Zero variance (identical runs) stays zero: nothing to rescale, no division."""
    d = _inflate_seeds(d)
    if d.values.shape[0] < 2:
        return d
    resid, nr = _run_residuals(d)
    own = (resid ** 2).sum(0) / np.maximum(nr - 1, 1)                        # [F]
    want = own if pooled_var is None else np.where(np.isfinite(pooled_var), pooled_var, own)
    ratio = np.where(own > 0, want / np.where(own > 0, own, 1.0), 1.0)
    k = np.sqrt(np.where(nr > 1, ratio * (nr + 1) / np.maximum(nr - 1, 1), 1.0))
    return _shift_runs(d, resid * k, resid)


def _inflate_paired(a: Data, b: Data, pool: RunPool) -> tuple[Data, Data]:
    """Paired runs (R each): at each shared fraction the run residuals split into a common part (e_A + e_B)/2 and
    the difference e_B - e_A; the difference is rescaled to twice the pooled two-way variance (its expectation
    when the replicate effect is removed), both by sqrt((R+1)/(R-1)). Fractions one condition lacks: own."""
    a, b = _inflate(a), _inflate(b)                                          # seeds, and runs at unshared fractions
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


def _weights(d: Data) -> np.ndarray:
    """Seeds per fraction (summed over runs): the fits' weights."""
    return np.isfinite(d.values).sum((0, 2)).astype(float)


def _seed_dof(d: Data) -> int:
    """The fewest seeds at any fraction - 1; the full-data fraction (1) with one seed is left out: every seed uses
    the whole set there, so it has no subset variance (a deterministic probe's zero)."""
    counts = np.isfinite(d.values).sum(-1).max(0)                            # [F] seeds of the fullest run
    keep = ~((counts == 1) & np.isclose(d.fractions, 1.0)) if len(counts) > 1 else np.ones(len(counts), bool)
    return int(counts[keep].min()) - 1


def _dof(a: Data, b: Data, pool: RunPool) -> int:
    """Pooled run df where either condition has several runs (the run level dominates), else the seed df."""
    if max(a.values.shape[0], b.values.shape[0]) > 1:
        return pool.df
    return min(_seed_dof(a), _seed_dof(b))


def _run_weights(rng: np.random.Generator, ra: int, rb: int, n: int, paired: bool):
    """Dirichlet(1) run weights per draw: one vector over run indices shared by both conditions when paired
    (replicate r of every condition shares its pretraining seed), else one per condition."""
    if paired:
        w = rng.dirichlet(np.ones(ra), n)
        return w, w
    return rng.dirichlet(np.ones(ra), n), rng.dirichlet(np.ones(rb), n)


def _inverse_variance(d: Data, run_var: np.ndarray) -> np.ndarray:
    """[F] fit weights 1 / Var(condition mean at f) = 1 / (seed variance / trials + run variance / runs). The seed
    variance is pooled over the condition's runs; a fraction with one seed has none at full data (every seed uses
    the whole set) and the largest measured elsewhere. Falls back to seed counts when nothing varies."""
    present = np.isfinite(d.values)
    dev2 = np.where(present, (d.values - _nanmean(d.values, -1)) ** 2, 0.0).sum((0, 2))
    dof = np.maximum(present.sum(-1) - 1, 0).sum(0)
    seed_var = np.where(dof > 0, dev2 / np.maximum(dof, 1), np.nan)
    known = seed_var[np.isfinite(seed_var)]
    fill = np.where(np.isclose(d.fractions, d.fractions.max()), 0.0, known.max() if len(known) else 0.0)
    seed_var = np.where(np.isfinite(seed_var), seed_var, fill)
    runs = present.any(-1).sum(0)
    var = seed_var / np.maximum(present.sum((0, 2)), 1) + np.nan_to_num(run_var) / np.maximum(runs, 1)
    if var.max() <= 0:
        return _weights(d)
    return 1.0 / np.maximum(var, 1e-6 * var.max())


def _estimate(a0: Data, b0: Data, sign: float, targets: Sequence[float], fit: Fit, wa: np.ndarray, wb: np.ndarray,
              ma, mb) -> list:
    """[(raw target, log f*_A, log f*_B)] per target level; the fits run on the larger-is-better scale."""
    fa = _Fitted(sign * ma, wa, a0.fractions, fit)
    fb = _Fitted(sign * mb, wb, b0.fractions, fit)
    score = sign * fa.at_full()                                              # raw full-data score
    out = []
    for level in targets:
        t_raw = (level if sign > 0 else 2.0 - level) * score
        xa = fa.crossing(sign * t_raw)
        xa = np.where(np.isfinite(xa), xa, np.where(xa < 0, fa.x[0], fa.x[-1]))
        out.append((t_raw, xa, fb.crossing(sign * t_raw)))
    return out


def _point_factors(point: list, b0: Data, targets: Sequence[float], ci: float, df: int, fit: Fit) -> list[Factor]:
    factors = []
    for level, (t, xa, xb) in zip(targets, point):
        xa, xb = float(xa), float(xb)
        reached, censored = xb != math.inf, xb == -math.inf
        f_b = b0.fractions[0] if censored else (math.exp(xb) if reached else math.nan)
        value = math.exp(xa) / (f_b if reached else b0.fractions[-1])
        factors.append(Factor(float(value), float(f_b), reached, censored, float(t), level, math.exp(xa), ci=ci,
                              df=max(df, 0), fit=fit))
    return factors


def compare(reference: Condition, candidate: Condition, higher_is_better: bool = True, *,
            targets: Sequence[float] = DEFAULT_TARGETS, n_bootstrap: int = DEFAULT_N_BOOTSTRAP,
            ci: float = DEFAULT_CI, seed: int = 0, fit: Fit = DEFAULT_FIT, pool: Sequence[Condition] = (),
            pair_runs: bool = True, weights: Weighting = "seeds") -> dict:
    """{"factors": [Factor per target level], "deltas": per-fraction mean(B) - mean(A) (> 0: B better) with CIs,
    "df", "runs_paired", "run_sd" (each condition's, before pooling), "pooled_run_sd", ...}. `pool`: further
    conditions whose pretraining runs join the pooled run variance (the report passes the task's other
    conditions); `pair_runs=False` resamples each condition's runs independently; `weights`: the fits' weight per
    fraction, its seed count or 1 / the variance of the condition's mean there (`_inverse_variance`)."""
    a0, b0 = as_data(reference), as_data(candidate)
    seeds = sorted(set(a0.seeds) | set(b0.seeds), key=str)
    a0, b0 = as_data(reference, seeds), as_data(candidate, seeds)
    ra, rb = a0.values.shape[0], b0.values.shape[0]
    paired = pair_runs and ra == rb > 1
    runs = RunPool.of([a0, b0, *(as_data(c) for c in pool)], paired)
    sign = 1.0 if higher_is_better else -1.0
    df = _dof(a0, b0, runs)
    widen = _t_quantile(1 - (1 - ci) / 2, df) / NormalDist().inv_cdf(1 - (1 - ci) / 2) if df >= 1 else math.nan
    wa, wb = ((_inverse_variance(a0, runs.variance(a0.fractions)), _inverse_variance(b0, runs.variance(b0.fractions)))
              if weights == "inverse-variance" else (_weights(a0), _weights(b0)))
    estimate = functools.partial(_estimate, a0, b0, sign, targets, fit, wa, wb)
    factors = _point_factors(estimate(_means(a0, None, None), _means(b0, None, None)), b0, targets, ci, df, fit)
    deltas = _delta_points(a0, b0, sign)
    if n_bootstrap > 0 and df >= 1:
        rng = np.random.default_rng(seed)
        a, b = (_inflate_paired(a0, b0, runs) if paired else
                (_inflate(a0, runs.variance(a0.fractions)), _inflate(b0, runs.variance(b0.fractions))))
        sw = rng.dirichlet(np.ones(len(seeds)), n_bootstrap)
        rwa, rwb = _run_weights(rng, ra, rb, n_bootstrap, paired or ra == rb == 1)
        ma, mb = _means(a, sw, rwa), _means(b, sw, rwb)
        for fac, (_, xa, xb) in zip(factors, estimate(ma, mb)):
            log_f = np.where(np.isfinite(xb), xa - xb, np.where(xb < 0, np.inf, -np.inf))
            _interval(fac, log_f, widen, ci, b0.fractions[0], b0.fractions[-1])
            fac.n_bootstrap = n_bootstrap
        _delta_intervals(deltas, sign * mb, sign * ma, widen, ci)
    for d in deltas:
        d.pop("_ja", None), d.pop("_jb", None)
    return {"factors": factors, "deltas": deltas, "df": max(df, 0), "fit": fit, "weights": weights,
            "runs_paired": paired, "seeds": {"reference": _seed_counts(a0), "candidate": _seed_counts(b0)},
            "runs": {"reference": ra, "candidate": rb},
            "run_sd": {"reference": _nan_none(run_sd(a0)), "candidate": _nan_none(run_sd(b0))},
            "pooled_run_sd": _nan_none(runs.sd(b0.fractions)), "run_df": runs.df}


def _nan_none(d: dict) -> dict:
    """{fraction: value} with string keys and NaN as None (JSON)."""
    return {format(f, ".6g"): (None if not math.isfinite(v) else v) for f, v in d.items()}


def _delta_intervals(deltas: list[dict], mb: np.ndarray, ma: np.ndarray, widen: float, ci: float) -> None:
    """Each per-fraction delta's interval from the draws (sign applied), widened by t/z like the factor's."""
    for d in deltas:
        draws = mb[:, d["_jb"]] - ma[:, d["_ja"]]
        lo, hi = np.quantile(draws, [(1 - ci) / 2, 1 - (1 - ci) / 2])
        d["ci_low"] = float(d["delta"] + (lo - d["delta"]) * widen)
        d["ci_high"] = float(d["delta"] + (hi - d["delta"]) * widen)


def _seed_counts(d: Data) -> dict:
    return {format(f, ".6g"): int(n) for f, n in zip(d.fractions, np.isfinite(d.values).sum((0, 2)))}


def _delta_points(a: Data, b: Data, sign: float) -> list[dict]:
    ma, mb = _means(a, None, None), _means(b, None, None)
    out = []
    for jb, f in enumerate(b.fractions):
        ja = np.nonzero(np.isclose(a.fractions, f))[0]
        if len(ja):
            out.append({"fraction": float(f), "delta": float(sign * (mb[jb] - ma[ja[0]])),
                        "ci_low": math.nan, "ci_high": math.nan, "_ja": int(ja[0]), "_jb": jb})
    return out


def _interval(fac: Factor, log_f: np.ndarray, widen: float, ci: float, fb_min: float, fb_max: float) -> None:
    """Percentile interval of log(factor) draws, widened around the estimate by t/z. The grid can show factors
    in [f*_A / fb_max, f*_A / fb_min]; an end beyond either (or among the +-inf draws) is open: a bound."""
    alpha = (1 - ci) / 2
    fac.censored_frac = float(np.mean(log_f == np.inf))
    fac.not_reached_frac = float(np.mean(log_f == -np.inf))
    lo, hi = np.quantile(log_f, [alpha, 1 - alpha], method="inverted_cdf")
    centre = math.log(fac.factor)
    low = centre - (centre - lo) * widen if lo < centre else lo
    high = centre + (hi - centre) * widen if hi > centre else hi
    bound_lo = math.log(fac.reference_fraction / fb_max)
    bound_hi = math.log(fac.reference_fraction / fb_min)
    fac.ci_low_open, fac.ci_high_open = bool(low < bound_lo), bool(high >= bound_hi)
    fac.ci_low = math.exp(min(max(low, bound_lo), bound_hi))
    fac.ci_high = math.exp(max(min(high, bound_hi), bound_lo))


@functools.lru_cache(maxsize=64)
def _t_quantile(p: float, df: int) -> float:
    """Student-t quantile (df >= 1) by bisection on the regularised incomplete beta (no scipy needed)."""
    if df >= 200:
        return NormalDist().inv_cdf(p)

    def cdf(t: float) -> float:
        x = df / (df + t * t)
        tail = 0.5 * _betainc(df / 2, 0.5, x)
        return 1 - tail if t > 0 else tail
    lo, hi = 0.0, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) (continued fraction, Numerical Recipes `betacf`)."""
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    front = math.exp(lbeta + a * math.log(x) + b * math.log1p(-x))
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _betainc(b, a, 1 - x)
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > 1e-300 else 1e-300)
    h = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > 1e-300 else 1e-300)
            c = 1.0 + num / c
            c = c if abs(c) > 1e-300 else 1e-300
            h *= d * c
        if abs(d * c - 1.0) < 1e-14:
            break
    return front * h / a


def efficiency_factor(reference: Condition, candidate: Condition, higher_is_better: bool = True, *,
                      level: float = 1.0, n_bootstrap: int = DEFAULT_N_BOOTSTRAP, ci: float = DEFAULT_CI,
                      seed: int = 0, fit: Fit = DEFAULT_FIT) -> Factor:
    """The factor at one target level (see `compare`)."""
    return compare(reference, candidate, higher_is_better, targets=(level,), n_bootstrap=n_bootstrap, ci=ci,
                   seed=seed, fit=fit)["factors"][0]


def full_data_target(reference: Condition, higher_is_better: bool = True, fit: Fit = "power") -> float:
    """The reference's fitted full-data score (target level 1)."""
    d = as_data(reference)
    sign = 1.0 if higher_is_better else -1.0
    return float(sign * _Fitted(sign * _means(d, None, None), _weights(d), d.fractions, fit).at_full())
