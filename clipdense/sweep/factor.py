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
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Literal, Sequence

import numpy as np

from clipdense.sweep.conditions import Condition, Data, RunPool, as_data, nanmean, run_sd
from clipdense.sweep.curves import Fit, FittedCurve
from clipdense.sweep.inflate import inflate, inflate_paired
from clipdense.sweep.student_t import t_quantile

__all__ = ["DEFAULT_CI", "DEFAULT_FIT", "DEFAULT_N_BOOTSTRAP", "DEFAULT_TARGETS", "Factor", "Fit", "compare",
           "efficiency_factor", "full_data_target", "run_sd"]
Weighting = Literal["seeds", "inverse-variance"]
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
    dev2 = np.where(present, (d.values - nanmean(d.values, -1)) ** 2, 0.0).sum((0, 2))
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
    fa = FittedCurve(sign * ma, wa, a0.fractions, fit)
    fb = FittedCurve(sign * mb, wb, b0.fractions, fit)
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
    widen = t_quantile(1 - (1 - ci) / 2, df) / NormalDist().inv_cdf(1 - (1 - ci) / 2) if df >= 1 else math.nan
    wa, wb = ((_inverse_variance(a0, runs.variance(a0.fractions)), _inverse_variance(b0, runs.variance(b0.fractions)))
              if weights == "inverse-variance" else (_weights(a0), _weights(b0)))
    estimate = functools.partial(_estimate, a0, b0, sign, targets, fit, wa, wb)
    factors = _point_factors(estimate(_means(a0, None, None), _means(b0, None, None)), b0, targets, ci, df, fit)
    deltas = _delta_points(a0, b0, sign)
    if n_bootstrap > 0 and df >= 1:
        rng = np.random.default_rng(seed)
        a, b = (inflate_paired(a0, b0, runs) if paired else
                (inflate(a0, runs.variance(a0.fractions)), inflate(b0, runs.variance(b0.fractions))))
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
    return float(sign * FittedCurve(sign * _means(d, None, None), _weights(d), d.fractions, fit).at_full())
