"""Student-t quantiles for the factor's small-sample widening (no scipy in the install)."""
from __future__ import annotations

import functools
import math
from statistics import NormalDist


@functools.lru_cache(maxsize=64)
def t_quantile(p: float, df: int) -> float:
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
