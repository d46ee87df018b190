"""The data-efficiency factor (pure numpy, no Ray): fits, targets, censoring, pairing, two levels, and its interval's
coverage on simulated sweeps with a known factor (bench/factor_sim.py's simulator)."""
import math

import numpy as np
import pytest

from bench.factor_sim import run_cell
from clipdense.sweep.curves import isotonic, power_fit
from clipdense.sweep.factor import compare, efficiency_factor, full_data_target
from clipdense.sweep.student_t import t_quantile

FRACTIONS = [2.0 ** -k for k in range(6, -1, -1)]


def _curve(fn, seeds=3, noise=(), fractions=FRACTIONS):
    """{fraction: {seed: fn(f) + noise[seed]}}: noise shared by all fractions (a seed effect)."""
    noise = list(noise) or [0.0] * seeds
    return {f: {s: float(fn(f)) + noise[s] for s in range(seeds)} for f in fractions}


def _pava(y, w):
    """The textbook pool-adjacent-violators loop, to check the vectorised min-max form against."""
    blocks = []
    for v, wt in zip(y, w):
        blocks.append([v, wt, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            v2, w2, n2 = blocks.pop()
            v1, w1, n1 = blocks.pop()
            blocks.append([(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    return [b[0] for b in blocks for _ in range(b[2])]


def test_isotonic_is_pool_adjacent_violators():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(50, 7)) + np.arange(7) * 0.3
    w = rng.integers(1, 6, 7).astype(float)
    fit = isotonic(y, w)
    assert np.all(np.diff(fit, axis=-1) >= -1e-12)
    for row, got in zip(y, fit):
        assert got == pytest.approx(_pava(row, w))


def test_power_fit_recovers_a_saturating_power_law():
    x = np.log(FRACTIONS)
    y = 0.5 + 0.1 * np.expm1(-0.5 * x) / -0.5                  # a + b*(f^c - 1)/c with c = -0.5 (on the grid)
    a, b, c = power_fit(y, np.ones(7), x)
    assert (float(a), float(b), float(c)) == pytest.approx((0.5, 0.1, -0.5), abs=1e-9)


@pytest.mark.parametrize("fit", ["power", "isotonic"])
@pytest.mark.parametrize("k", [2.0, 4.0, 10.0])
def test_noise_free_shifted_curves_give_the_shift(fit, k):
    rising = lambda f: 0.30 + 0.02 * math.log2(f)                # still rising at full data
    f = compare(_curve(rising), _curve(lambda f: rising(k * f)), n_bootstrap=0, fit=fit)["factors"]
    assert [x.level for x in f] == [1.0, 0.95]
    full, lower = f
    assert full.target == pytest.approx(0.30) and lower.target == pytest.approx(0.95 * 0.30)
    assert full.reached and not full.censored and full.factor == pytest.approx(k)
    assert full.fraction == pytest.approx(1 / k) and full.reference_fraction == pytest.approx(1.0)
    assert lower.factor == pytest.approx(k) and lower.reference_fraction == pytest.approx(2 ** (-0.015 / 0.02))


def test_lower_is_better_target_is_rmse_times_1_05():
    rmse = lambda f: 0.40 - 0.03 * math.log2(f)                  # falls with more data
    ref, cand = _curve(rmse), _curve(lambda f: rmse(4 * f))
    f = compare(ref, cand, higher_is_better=False, n_bootstrap=0)["factors"]
    assert f[0].target == pytest.approx(0.40) and f[1].target == pytest.approx(0.42)
    assert f[0].factor == pytest.approx(4.0) and f[1].factor == pytest.approx(4.0)
    assert full_data_target(ref, higher_is_better=False) == pytest.approx(0.40)
    backwards = compare(ref, cand, higher_is_better=True, n_bootstrap=0)["factors"][0]
    assert not backwards.reached                                  # read as higher-is-better, B never "reaches" A


def test_censored_when_already_past_the_target_at_the_smallest_fraction():
    ref = _curve(lambda f: 0.30 + 0.02 * math.log2(f), noise=[-0.002, 0.0, 0.002])
    cand = _curve(lambda f: 0.50 + 0.02 * math.log2(f), noise=[0.001, -0.001, 0.0])
    f = efficiency_factor(ref, cand, n_bootstrap=300)
    assert f.reached and f.censored and f.fraction == pytest.approx(1 / 64)
    assert f.factor == pytest.approx(64 * f.reference_fraction)    # ">= f*_A / f_min": a lower bound
    assert f.ci_high_open and f.ci_high == pytest.approx(f.factor) and f.censored_frac == 1.0
    assert f.to_dict()["ci_high_open"] is True


def test_not_reached_is_an_upper_bound():
    ref = _curve(lambda f: 0.30 + 0.02 * math.log2(f), noise=[-0.002, 0.0, 0.002])
    cand = _curve(lambda f: 0.20 + 0.02 * math.log2(f), noise=[0.001, -0.001, 0.0])
    f = efficiency_factor(ref, cand, n_bootstrap=300)
    assert not f.reached and math.isnan(f.fraction) and f.factor == pytest.approx(1.0)
    assert f.ci_low_open and f.not_reached_frac == 1.0


def test_pairing_cancels_seed_effects_shared_by_both_backbones():
    seed_effect = [-0.03, 0.0, 0.03]                             # the seed's subset: same for both backbones
    rising = lambda f: 0.30 + 0.02 * math.log2(f)
    ref = _curve(rising, noise=seed_effect)
    cand = _curve(lambda f: rising(4 * f), noise=seed_effect)
    paired = efficiency_factor(ref, cand, n_bootstrap=500)
    relabelled = {f: {(s + 1) % 3: v for s, v in vals.items()} for f, vals in cand.items()}   # seeds unmatched
    unpaired = efficiency_factor(ref, relabelled, n_bootstrap=500)
    assert paired.factor == pytest.approx(4.0) and unpaired.factor == pytest.approx(4.0)
    assert paired.ci_high / paired.ci_low == pytest.approx(1.0, abs=1e-6)   # the shared effect cancels exactly
    assert unpaired.ci_high / unpaired.ci_low > 1.5


def test_more_seeds_at_small_fractions_and_per_fraction_deltas():
    rng = np.random.default_rng(3)
    rising = lambda f: 0.30 + 0.02 * math.log2(f)
    ref = {f: {s: rising(f) + rng.normal(0, 0.005) for s in range(5 if f < 0.25 else 3)} for f in FRACTIONS}
    cand = {f: {s: rising(4 * f) + rng.normal(0, 0.005) for s in range(5 if f < 0.25 else 3)} for f in FRACTIONS}
    res = compare(ref, cand, n_bootstrap=1000)
    assert res["df"] == 2                                          # the fewest seeds at a fraction (3) - 1
    assert res["seeds"]["candidate"]["0.125"] == 5 and res["seeds"]["candidate"]["1"] == 3
    f = res["factors"][0]
    assert f.ci_low < 4.0 < f.ci_high and f.ci_high / f.ci_low < 4
    assert [d["fraction"] for d in res["deltas"]] == FRACTIONS
    for d in res["deltas"]:                                        # true delta: 2 octaves x 0.02 = 0.04
        assert d["ci_low"] < 0.04 < d["ci_high"] and d["ci_low"] > 0


def test_two_levels_pretraining_runs_widen_the_interval():
    rng = np.random.default_rng(5)
    rising = lambda f: 0.30 + 0.02 * math.log2(f)
    seeds = [rng.normal(0, 0.004, 3) for _ in range(4)]
    runs_a = [_curve(lambda f, o=o: rising(f) + o, noise=n) for o, n in zip((-0.01, 0.01), seeds[:2])]
    runs_b = [_curve(lambda f, o=o: rising(4 * f) + o, noise=n) for o, n in zip((0.012, -0.008), seeds[2:])]
    two = compare(runs_a, runs_b, n_bootstrap=1000)
    one = compare(runs_a[0], runs_b[0], n_bootstrap=1000)          # one run each: run variance unseen
    assert two["runs"] == {"reference": 2, "candidate": 2} and two["df"] == 1      # paired: (2 - 1)(2 - 1)
    f2, f1 = two["factors"][0], one["factors"][0]
    assert f2.ci_low < 4.0 < f2.ci_high
    assert f2.ci_high / f2.ci_low > f1.ci_high / f1.ci_low


def _replicates(base, offsets, seed_noise, rng, fractions=FRACTIONS):
    """One curve per pretraining run: base(f) + the run's offset + per-trial noise (3 seeds)."""
    return [_curve(lambda f, o=o: base(f) + o + rng.normal(0, seed_noise), fractions=fractions) for o in offsets]


def test_paired_runs_cancel_an_effect_shared_by_replicate_index():
    """Replicate r of both conditions shares its pretraining seed: a run effect shared by index cancels when the
    runs are resampled with one weight vector, not when each condition draws its own."""
    rng = np.random.default_rng(2)
    rising = lambda f: 0.30 + 0.02 * math.log2(f)
    offsets = [-0.02, 0.0, 0.025]                                  # replicate r's effect, the same in A and B
    ref = _replicates(rising, offsets, 0.001, rng)
    cand = _replicates(lambda f: rising(4 * f), offsets, 0.001, rng)
    paired = compare(ref, cand, n_bootstrap=500, targets=(1.0,))
    unpaired = compare(ref, cand, n_bootstrap=500, targets=(1.0,), pair_runs=False)
    assert paired["runs_paired"] and not unpaired["runs_paired"]
    fp, fu = paired["factors"][0], unpaired["factors"][0]
    assert fp.ci_low < 4.0 < fp.ci_high
    assert fu.ci_high / fu.ci_low > 2 * (fp.ci_high / fp.ci_low)
    uneven = compare(ref, cand[:2], n_bootstrap=100, targets=(1.0,))
    assert paired["df"] == 2                                       # paired, two conditions: runs - 1
    assert not uneven["runs_paired"] and uneven["df"] == 3         # unpaired pool: (3 - 1) + (2 - 1)


def test_unpaired_run_variance_is_pooled_across_conditions():
    rng = np.random.default_rng(4)
    rising = lambda f: 0.30 + 0.02 * math.log2(f)
    ref = _replicates(rising, [-0.01, 0.01], 0.0, rng)             # run SD sqrt(2) x 0.01
    cand = _replicates(lambda f: rising(2 * f), [0.0, 0.0], 0.0, rng)   # identical runs: SD 0 before pooling
    other = _replicates(rising, [-0.03, 0.0, 0.03], 0.0, rng)      # SD 0.03: joins the pool only
    res = compare(ref, cand, n_bootstrap=300, pool=[other], pair_runs=False)
    assert not res["runs_paired"] and res["df"] == res["run_df"] == 1 + 1 + 2
    assert res["run_sd"]["reference"]["1"] == pytest.approx(0.01 * math.sqrt(2))
    assert res["run_sd"]["candidate"]["1"] == 0.0
    pooled = math.sqrt((2 * 0.01 ** 2 + 0 + 2 * 0.03 ** 2) / 4)
    assert all(v == pytest.approx(pooled) for v in res["pooled_run_sd"].values())
    alone = compare(ref, cand, n_bootstrap=300, pair_runs=False)
    assert alone["df"] == 2
    f, fa = res["factors"][0], alone["factors"][0]      # pooled SD 0.024 x t(4) 2.78 > 0.01 x t(2) 4.30
    assert f.ci_low < 2.0 < f.ci_high and f.ci_high / f.ci_low > fa.ci_high / fa.ci_low


def test_paired_pool_leaves_out_the_replicate_effect():
    """Paired runs pool the two-way residuals m[c, r] - m[c, .] - m[., r] + m[., .]: replicate r's effect, shared
    by every condition, is no run noise of a difference; df = (conditions - 1)(runs - 1)."""
    rng = np.random.default_rng(8)
    rising = lambda f: 0.30 + 0.02 * math.log2(f)
    rep = np.array([-0.02, 0.0, 0.025])
    ref = _replicates(rising, rep + [0.01, -0.01, 0.0], 0.0, rng)
    cand = _replicates(lambda f: rising(4 * f), rep, 0.0, rng)
    other = _replicates(rising, rep + [-0.01, 0.01, 0.0], 0.0, rng)
    res = compare(ref, cand, n_bootstrap=300, pool=[other])
    assert res["runs_paired"] and res["df"] == res["run_df"] == (3 - 1) * (3 - 1)
    assert all(v == pytest.approx(0.01) for v in res["pooled_run_sd"].values())
    assert res["run_sd"]["candidate"]["1"] == pytest.approx(float(np.std(rep, ddof=1)))   # before pooling
    unpaired = compare(ref, cand, n_bootstrap=300, pool=[other], pair_runs=False)["factors"][0]   # rep kept
    f = res["factors"][0]
    assert f.ci_low < 4.0 < f.ci_high and unpaired.ci_high / unpaired.ci_low > 3 * f.ci_high / f.ci_low


def test_zero_variance_at_full_data_no_nan():
    """The preset's grid: 5 seeds below fraction 1, one (deterministic) at 1, where runs may also coincide."""
    fractions = [1 / 256, 1 / 64, 1 / 16, 1 / 4, 1.0]
    rng = np.random.default_rng(6)
    rising = lambda f: 0.30 + 0.02 * math.log2(f)

    def cond(shift, offsets):
        return [{f: {s: rising(shift * f) + (0.0 if f == 1 else o + rng.normal(0, 0.004))
                     for s in range(1 if f == 1 else 5)} for f in fractions} for o in offsets]
    with np.errstate(all="raise"):
        one = compare(cond(4, [0.0]), cond(4, [0.0])[:1], n_bootstrap=300)
        res = compare(cond(1, [-0.005, 0.0, 0.005]), cond(4, [0.004, -0.002, 0.0]), n_bootstrap=300)
    assert one["df"] == 4                                          # 5 seeds - 1: fraction 1's single seed is exact
    assert res["df"] == 2 and res["run_sd"]["reference"]["1"] == 0.0     # paired, two conditions: runs - 1
    assert res["pooled_run_sd"]["1"] == pytest.approx(0.0, abs=1e-12)
    for r in (one, res):
        f = r["factors"][0]
        assert math.isfinite(f.ci_low) and math.isfinite(f.ci_high) and f.ci_low <= f.factor <= f.ci_high
        full = next(d for d in r["deltas"] if d["fraction"] == 1.0)
        assert full["ci_low"] == pytest.approx(full["delta"]) == pytest.approx(full["ci_high"])


def test_inverse_variance_weights_anchor_the_fit_at_an_exact_full_data_point():
    """One exact seed at fraction 1, noisy seeds below: weighting fractions by 1 / Var(mean) makes the fit pass
    through the full-data point (the target), where seed-count weights let the noisy fractions pull it away."""
    fractions = [1 / 256, 1 / 64, 1 / 16, 1 / 4, 1.0]
    rng = np.random.default_rng(9)
    curve = lambda f: 0.33 - 0.01 * (f ** -0.5 - 1) / 0.5
    ref = {f: ({0: curve(f)} if f == 1 else {s: curve(f) + rng.normal(0, 0.02) for s in range(5)}) for f in fractions}
    cand = {f: ({0: curve(4 * f)} if f == 1 else {s: curve(4 * f) + rng.normal(0, 0.02) for s in range(5)})
            for f in fractions}
    by_var = compare(ref, cand, n_bootstrap=200, weights="inverse-variance")["factors"][0]
    by_seeds = compare(ref, cand, n_bootstrap=200)["factors"][0]
    assert by_var.target == pytest.approx(0.33, abs=1e-4)
    assert abs(by_seeds.target - 0.33) > 10 * abs(by_var.target - 0.33)
    assert by_var.ci_low < 4.0 < by_var.ci_high


def test_one_seed_gives_no_interval_and_lists_are_seed_positions():
    ref = {0.25: [0.30], 0.5: [0.32], 1.0: [0.34]}
    cand = {0.25: [0.32], 0.5: [0.34], 1.0: [0.36]}
    f = efficiency_factor(ref, cand, n_bootstrap=100)
    assert f.factor == pytest.approx(2.0) and f.df == 0 and f.n_bootstrap == 0
    assert f.to_dict()["ci_low"] is None


def test_student_t_quantiles():
    assert [round(t_quantile(0.975, d), 3) for d in (1, 2, 3, 4, 10)] == [12.706, 4.303, 3.182, 2.776, 2.228]


def test_seeded_and_deterministic():
    rng = np.random.default_rng(1)
    ref = {f: [0.3 + 0.02 * math.log2(f) + rng.normal(0, 0.01) for _ in range(3)] for f in FRACTIONS}
    cand = {f: [0.34 + 0.02 * math.log2(f) + rng.normal(0, 0.01) for _ in range(3)] for f in FRACTIONS}
    a, b = (efficiency_factor(ref, cand, n_bootstrap=300, seed=7) for _ in range(2))
    assert (a.ci_low, a.ci_high) == (b.ci_low, b.ci_high)


@pytest.mark.parametrize("shape", ["rising", "flattening"])
def test_simulated_coverage_and_error_at_3_seeds(shape):
    """150 simulated sweeps (true factor 4, 3 seeds, noise a quarter octave of slope): the 95% interval covers
    the true factor in >= 90% and the median relative error stays near the 10% goal (0.12: room for the Monte
    Carlo noise of 150 sweeps; bench/factor_sim.py measures it on 500), at both targets."""
    cell = run_cell(shape, 4.0, 3, 0.25, sweeps=150, n_bootstrap=300, seed=11)
    for level, r in cell.items():
        assert r["coverage"] >= 0.90, (level, r)
        assert r["median_rel_error"] <= 0.12, (level, r)
