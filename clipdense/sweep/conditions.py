"""A sweep condition as arrays, and the spread of its pretraining runs.

A curve is `{fraction: [value per seed]}` (list position = seed) or `{fraction: {seed: value}}`; a condition with
several pretraining runs is a list of curves (one per run). `as_data` makes it `Data` (values [R, F, S]); `run_sd`
and `RunPool` measure the run level that the factor's interval resamples (sweep/factor.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence, Union

import numpy as np

Curve = Mapping[float, Union[Sequence[float], Mapping[int, float]]]
Condition = Union[Curve, Sequence[Curve]]          # one curve, or one per pretraining run


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


def nanmean(v: np.ndarray, axis: int) -> np.ndarray:
    ok = np.isfinite(v)
    return np.where(ok, v, 0.0).sum(axis, keepdims=True) / np.maximum(ok.sum(axis, keepdims=True), 1)


def run_means(d: Data) -> np.ndarray:
    """[R, F] each run's mean over its seeds at each fraction (NaN where the run lacks the fraction)."""
    present = np.isfinite(d.values)
    with np.errstate(invalid="ignore"):
        return np.where(present, d.values, 0.0).sum(-1) / np.where(present.any(-1), present.sum(-1), np.nan)


def run_ss(d: Data) -> tuple[np.ndarray, np.ndarray]:
    """([F] sum of squared deviations of the run means from their mean, [F] runs at the fraction - 1)."""
    m = run_means(d)
    ok = np.isfinite(m)
    dev = np.where(ok, m - nanmean(m, 0), 0.0)
    return (dev ** 2).sum(0), np.maximum(ok.sum(0) - 1, 0)


def run_sd(cond: Condition | Data) -> dict[float, float]:
    """{fraction: SD (ddof 1) across a condition's pretraining runs of each run's mean over its finetuning seeds}
    (the seed mean's own noise included); NaN where fewer than two runs have the fraction."""
    d = cond if isinstance(cond, Data) else as_data(cond)
    ss, dof = run_ss(d)
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
                for f, m in zip(d.fractions, run_means(d).T):
                    if np.all(np.isfinite(m)):
                        by_fraction.setdefault(fraction_key(f), []).append(m)
            for key, rows in by_fraction.items():
                m = np.asarray(rows)                                          # [C, R]
                e = m - m.mean(1, keepdims=True) - m.mean(0, keepdims=True) + m.mean()
                pool.ss[key] = [float((e ** 2).sum()), (len(m) - 1) * (m.shape[1] - 1)]
            return pool
        for d in conditions:
            pool.df += d.values.shape[0] - 1
            for f, ss, dof in zip(d.fractions, *run_ss(d)):
                acc = pool.ss.setdefault(fraction_key(f), [0.0, 0])
                acc[0], acc[1] = acc[0] + float(ss), acc[1] + int(dof)
        return pool

    def variance(self, fractions: np.ndarray) -> np.ndarray:
        """[F] pooled run variance at each fraction; NaN where no condition has two runs there."""
        acc = [self.ss.get(fraction_key(f), [0.0, 0]) for f in fractions]
        return np.asarray([ss / dof if dof > 0 else math.nan for ss, dof in acc])

    def sd(self, fractions: np.ndarray) -> dict[float, float]:
        return {float(f): float(math.sqrt(v)) for f, v in zip(fractions, self.variance(fractions))}


def fraction_key(f: float) -> str:
    return format(float(f), ".9g")
