"""The data-efficiency factor on constructed curves (pure numpy, no Ray)."""
import math

import numpy as np
import pytest

from clipdense.sweep.factor import crossing_fraction, efficiency_factor, fraction_deltas

REF = {0.25: [0.30, 0.30], 0.5: [0.40, 0.40], 1.0: [0.49, 0.51]}       # full-data mean 0.5


def test_reached_exactly_at_a_grid_point():
    b = {0.125: [0.2], 0.25: [0.3], 0.5: [0.5, 0.5], 1.0: [0.7]}
    f = efficiency_factor(REF, b, n_bootstrap=0)
    assert f.reached and not f.censored
    assert f.target == pytest.approx(0.5)
    assert f.fraction == pytest.approx(0.5)
    assert f.factor == pytest.approx(2.0)


def test_reached_between_points_log_interpolated():
    # B: 0.4 at 1/4, 0.6 at 1/2; target 0.5 is half way in value -> half way in log f: f = sqrt(1/4 * 1/2)
    b = {0.125: [0.1], 0.25: [0.4], 0.5: [0.6], 1.0: [0.8]}
    f = efficiency_factor(REF, b, n_bootstrap=0)
    assert f.fraction == pytest.approx(math.sqrt(0.125))
    assert f.factor == pytest.approx(1 / math.sqrt(0.125))          # 2.828...
    # a quarter of the way: 0.45 -> log2 f = -2 + 0.25
    assert crossing_fraction([0.25, 0.5], [0.4, 0.6], 0.45)[0] == pytest.approx(2 ** -1.75)


def test_not_reached():
    b = {0.25: [0.1], 0.5: [0.2], 1.0: [0.45, 0.46]}
    f = efficiency_factor(REF, b, n_bootstrap=50)
    assert not f.reached
    assert math.isnan(f.factor) and math.isnan(f.fraction)
    assert f.to_dict()["factor"] is None
    assert f.not_reached_frac == 1.0
    assert f.ci_low == 0.0 and f.ci_high == 0.0


def test_matched_at_smallest_fraction_is_a_censored_lower_bound():
    b = {0.25: [0.55], 0.5: [0.6], 1.0: [0.7]}
    f = efficiency_factor(REF, b, n_bootstrap=0)
    assert f.reached and f.censored
    assert f.factor == pytest.approx(4.0)


def test_first_crossing_wins_on_a_non_monotone_curve():
    fr, censored = crossing_fraction([0.125, 0.25, 0.5, 1.0], [0.2, 0.6, 0.3, 0.7], 0.5)
    assert not censored and 0.125 < fr < 0.25


def test_lower_is_better_rmse():
    ref = {0.5: [0.5], 1.0: [0.39, 0.41]}                               # full-data RMSE 0.4
    b = {0.125: [0.6], 0.25: [0.45], 0.5: [0.35], 1.0: [0.3]}
    f = efficiency_factor(ref, b, higher_is_better=False, n_bootstrap=0)
    assert f.fraction == pytest.approx(math.sqrt(0.25 * 0.5))           # 0.45 -> 0.35 crosses 0.4 half way
    assert f.factor == pytest.approx(2 * math.sqrt(2))
    wrong_direction = efficiency_factor(ref, b, higher_is_better=True, n_bootstrap=0)
    # read as higher-is-better, A itself "reaches" at its smallest fraction (0.5) and B at its own (1/8): 0.5 / (1/8)
    assert wrong_direction.censored and wrong_direction.reference_fraction == pytest.approx(0.5)
    assert wrong_direction.factor == pytest.approx(4.0)


def test_noisy_seeds_ci_contains_the_true_factor():
    fractions = [1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0]
    true_a = {f: 0.30 + 0.05 * math.log2(f * 16) for f in fractions}    # 0.30 ... 0.50
    true_b = {f: 0.38 + 0.05 * math.log2(f * 16) for f in fractions}    # reaches 0.50 at log2 f = -1.6
    noise = np.array([-0.02, -0.01, 0.0, 0.01, 0.02])                   # zero-mean: point estimate = truth
    a = {f: list(v + noise) for f, v in true_a.items()}
    b = {f: list(v + noise[::-1]) for f, v in true_b.items()}
    true_factor = 2 ** 1.6
    f = efficiency_factor(a, b, n_bootstrap=400, seed=1)
    assert f.factor == pytest.approx(true_factor)
    assert f.ci_low < true_factor < f.ci_high
    assert f.ci_high / f.ci_low < 2.0                                   # noise is small: the CI is not vacuous
    assert f.not_reached_frac == 0.0
    again = efficiency_factor(a, b, n_bootstrap=400, seed=1)
    assert (again.ci_low, again.ci_high) == (f.ci_low, f.ci_high)      # seeded


def test_bootstrap_counts_resamples_that_do_not_reach():
    ref = {1.0: [0.5, 0.5, 0.5]}
    b = {0.5: [0.3, 0.3, 0.3], 1.0: [0.3, 0.5, 0.7]}                    # mean exactly reaches at f=1
    f = efficiency_factor(ref, b, n_bootstrap=300, seed=0)
    assert f.reached and f.factor == pytest.approx(1.0)
    assert 0.1 < f.not_reached_frac < 0.9
    assert f.ci_low == 0.0


def test_missing_reference_full_data():
    f = efficiency_factor({0.5: [0.4]}, {0.5: [0.5], 1.0: [0.6]}, n_bootstrap=10)
    assert not f.reached and math.isnan(f.target)


def test_a_reference_that_peaks_early_cannot_inflate_the_factor():
    # A's full-data mean (0.45) sits below its own quarter-data mean: A itself reaches 0.45 between 1/16 and 1/4.
    a = {0.0625: [0.40], 0.25: [0.50], 1.0: [0.45]}
    same = efficiency_factor(a, a, n_bootstrap=0)
    assert same.reference_fraction == pytest.approx(same.fraction) and same.factor == pytest.approx(1.0)
    assert 0.0625 < same.reference_fraction < 0.25
    b = {0.0625: [0.30], 0.25: [0.45], 1.0: [0.50]}            # reaches 0.45 only at 1/4: needs more data than A
    f = efficiency_factor(a, b, n_bootstrap=200, seed=0)
    assert f.fraction == pytest.approx(0.25) and f.factor < 1.0
    assert f.factor == pytest.approx(same.reference_fraction / 0.25)
    assert f.ci_low <= f.factor <= f.ci_high


def test_fraction_deltas_are_signed_so_positive_is_better():
    a = {0.25: [0.5, 0.7], 1.0: [1.0]}
    b = {0.25: [0.4], 0.5: [0.9], 1.0: [1.2]}
    assert fraction_deltas(a, b, higher_is_better=True) == [
        {"fraction": 0.25, "delta": pytest.approx(-0.2)}, {"fraction": 1.0, "delta": pytest.approx(0.2)}]
    assert [d["delta"] for d in fraction_deltas(a, b, higher_is_better=False)] == [pytest.approx(0.2),
                                                                                     pytest.approx(-0.2)]
