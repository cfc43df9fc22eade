"""pipeline_lib.math.frontier: interpolation on hand-made frontiers, the paired hierarchical
bootstrap against closed forms (SE of a mean, CI coverage of a known mean, paired vs unpaired
gap) and Pareto flags with and without standard errors."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline_lib.math.frontier import (
    KL_ANALYTIC_BON,
    KL_BON_TIES,
    KL_ESTIMATORS,
    KL_K1,
    KL_K3,
    _interp_batch,
    bootstrap_frontier,
    check_kl_estimator,
    interpolate_frontier,
    pareto_flags,
    pareto_flags_se,
)
from pipeline_lib.math.winrate import pareto_frontier

# ---------------------------------------------------------------------------------------------
# Interpolation
# ---------------------------------------------------------------------------------------------


def test_interpolate_hand_made_frontier():
    # knots (0, 0), (1, 2), (3, 3): slope 2 then 1/2
    grid = [-0.5, 0.0, 0.5, 1.0, 2.0, 3.0, 4.0]
    vals, covered = interpolate_frontier([0.0, 1.0, 3.0], [0.0, 2.0, 3.0], grid)
    np.testing.assert_array_equal(covered, [False, True, True, True, True, True, False])
    np.testing.assert_allclose(vals[covered], [0.0, 1.0, 2.0, 2.5, 3.0], rtol=0, atol=1e-15)
    assert np.isnan(vals[~covered]).all()


def test_interpolate_unsorted_input_and_grid():
    kl, val = [3.0, 0.0, 1.0], [3.0, 0.0, 2.0]
    vals, covered = interpolate_frontier(kl, val, [2.0, 0.25, 5.0])
    np.testing.assert_allclose(vals[:2], [2.5, 0.5])
    assert np.isnan(vals[2]) and covered.tolist() == [True, True, False]


def test_interpolate_duplicate_kls_are_averaged():
    # two points at KL 1 (values 1 and 3) merge into the knot (1, 2)
    vals, _ = interpolate_frontier([0.0, 1.0, 1.0, 2.0], [0.0, 1.0, 3.0, 4.0], [0.5, 1.0, 1.5])
    np.testing.assert_allclose(vals, [1.0, 2.0, 3.0])


def test_interpolate_single_point_covers_only_itself():
    vals, covered = interpolate_frontier([1.0, 1.0], [4.0, 6.0], [0.5, 1.0, 1.5])
    assert covered.tolist() == [False, True, False]
    assert vals[1] == 5.0 and np.isnan(vals[[0, 2]]).all()


@pytest.mark.parametrize(
    ("kl", "value", "grid", "match"),
    [
        ([0.0, np.nan], [1.0, 2.0], [0.5], "kl must contain only finite"),
        ([0.0, 1.0], [1.0, np.inf], [0.5], "value must contain only finite"),
        ([0.0, 1.0], [1.0, 2.0], [np.nan], "grid must contain only finite"),
        ([0.0, 1.0], [1.0, 2.0, 3.0], [0.5], "same shape"),
        ([[0.0, 1.0]], [[1.0, 2.0]], [0.5], "kl must be 1-D"),
        ([], [], [0.5], "must not be empty"),
    ],
)
def test_interpolate_rejects_bad_input(kl, value, grid, match):
    with pytest.raises(ValueError, match=match):
        interpolate_frontier(kl, value, grid)


def test_batch_interpolation_matches_interpolate_frontier():
    rng = np.random.default_rng(3)
    b, k, v = 40, 7, 2
    x = rng.integers(0, 6, size=(b, k)).astype(float) / 2  # many duplicate KLs
    y = rng.normal(size=(b, k, v))
    grid = np.linspace(-0.5, 3.5, 17)
    out = _interp_batch(x, y, grid)
    for row in range(b):
        for m in range(v):
            expected, covered = interpolate_frontier(x[row], y[row, :, m], grid)
            np.testing.assert_allclose(out[row, :, m], expected, rtol=1e-12, atol=1e-12)
            assert np.isnan(out[row, ~covered, m]).all()


# ---------------------------------------------------------------------------------------------
# Bootstrap
# ---------------------------------------------------------------------------------------------


def _const_kl(levels, s, p):
    """(R, S, P) per-prompt KLs equal to levels[r] everywhere (no KL noise)."""
    return np.broadcast_to(np.asarray(levels, float)[:, None, None], (len(levels), s, p)).copy()


def _sweep_data(rng, r=4, s=3, p=60):
    kl = rng.gamma(2.0, 0.5, size=(r, s, p)) * np.linspace(0.5, 3.0, r)[:, None, None]
    difficulty = rng.normal(size=p)
    gold = np.sqrt(kl) + difficulty + 0.3 * rng.normal(size=(r, s, p))
    win = 1.0 / (1.0 + np.exp(-gold))
    ns = np.array([1, 2, 4, 8, 16])
    bon_kl = np.log(ns) - (ns - 1) / ns
    bon_gold = np.sqrt(2 * bon_kl)[:, None] + difficulty + 0.3 * rng.normal(size=(ns.size, p))
    bon_win = 1.0 / (1.0 + np.exp(-bon_gold))
    return kl, {"gold": gold, "win_rate": win}, bon_kl, {"gold": bon_gold, "win_rate": bon_win}


def test_estimate_is_interpolation_of_full_data_means():
    kl, vals, bon_kl, bon_vals = _sweep_data(np.random.default_rng(0))
    res = bootstrap_frontier(kl, vals, bon_kl, bon_vals, n_boot=20, rng=0)
    np.testing.assert_array_equal(res.grid, bon_kl)  # default grid: BoN's KLs
    for i, m in enumerate(("gold", "win_rate")):
        expected, covered = interpolate_frontier(
            kl.mean(axis=(1, 2)), vals[m].mean(axis=(1, 2)), bon_kl
        )
        np.testing.assert_allclose(res.method.estimate[i], expected, rtol=1e-12)
        np.testing.assert_array_equal(res.covered, covered)
        # BoN's analytic KLs are the grid: its values are the per-n means, exactly
        np.testing.assert_allclose(res.bon.estimate[i], bon_vals[m].mean(axis=1), rtol=1e-13)
        np.testing.assert_array_equal(res.gap.estimate[i],
                                      res.method.estimate[i] - res.bon.estimate[i])
    assert res.metrics == ("gold", "win_rate")
    assert res.kl_estimator == KL_K1 and res.bon_kl_estimator == KL_ANALYTIC_BON


def test_uncovered_grid_points_are_nan_with_zero_coverage():
    p = 30
    rng = np.random.default_rng(1)
    kl = _const_kl([1.0, 2.0], 1, p)
    gold = rng.normal(size=(2, 1, p))
    res = bootstrap_frontier(kl, {"gold": gold}, [0.0, 1.5, 3.0], {"gold": rng.normal(size=(3, p))},
                             n_boot=50, rng=0)
    assert res.covered.tolist() == [False, True, False]
    np.testing.assert_array_equal(res.boot_coverage, [0.0, 1.0, 0.0])
    for iv in (res.method, res.gap):
        for a in (iv.estimate, iv.low, iv.high, iv.se):
            assert np.isnan(a[0, [0, 2]]).all() and np.isfinite(a[0, 1])
    assert np.isfinite(res.bon.estimate).all()  # BoN covers its own KLs


def test_prompt_level_se_matches_sigma_over_sqrt_n():
    p, sigma = 400, 2.0
    rng = np.random.default_rng(11)
    gold = 5.0 + sigma * rng.normal(size=(2, 1, p))
    res = bootstrap_frontier(_const_kl([0.0, 1.0], 1, p), {"gold": gold}, [0.0, 1.0],
                             {"gold": rng.normal(size=(2, p))}, n_boot=4000, rng=5)
    se = res.method.se[0, 0]  # grid point 0 is run 0
    # the bootstrap SE of a mean is the plug-in sd / sqrt(P): sqrt(Σ(x - x̄)² / P) / sqrt(P)
    plug_in = gold[0, 0].std(ddof=0) / np.sqrt(p)
    assert se == pytest.approx(plug_in, rel=0.05)
    assert se == pytest.approx(sigma / np.sqrt(p), rel=0.10)


def test_seed_level_se_and_resample_seeds_flag():
    s, sigma = 40, 1.0
    rng = np.random.default_rng(12)
    gold = sigma * rng.normal(size=(2, s, 1))  # one prompt: only the seeds vary
    args = (_const_kl([0.0, 1.0], s, 1), {"gold": gold}, [0.0, 1.0], {"gold": np.zeros((2, 1))})
    res = bootstrap_frontier(*args, n_boot=4000, rng=6)
    assert res.method.se[0, 0] == pytest.approx(gold[0, :, 0].std(ddof=0) / np.sqrt(s), rel=0.05)
    fixed = bootstrap_frontier(*args, n_boot=50, rng=6, resample_seeds=False)
    np.testing.assert_allclose(fixed.method.se, 0.0, rtol=0, atol=1e-15)
    np.testing.assert_allclose(fixed.method.low, fixed.method.estimate, rtol=1e-13)
    np.testing.assert_allclose(fixed.method.high, fixed.method.estimate, rtol=1e-13)


def test_hierarchical_se_matches_closed_form_for_additive_data():
    # gold[s, p] = u_s + a_p: a replicate's mean is mean*(u) + mean*(a) with independent draws,
    # so Var* = var0(u) / S + var0(a) / P exactly (var0: plug-in variance).
    s, p = 10, 200
    rng = np.random.default_rng(13)
    u, a = rng.normal(size=s), 0.5 * rng.normal(size=p)
    gold = np.broadcast_to(u[:, None] + a[None, :], (2, s, p)).copy()
    res = bootstrap_frontier(_const_kl([0.0, 1.0], s, p), {"gold": gold}, [0.0, 1.0],
                             {"gold": np.zeros((2, p))}, n_boot=4000, rng=7)
    closed = np.sqrt(u.var() / s + a.var() / p)
    assert res.method.se[0, 0] == pytest.approx(closed, rel=0.05)


def test_ci_covers_known_mean_at_nominal_rate():
    # Two runs at KL 0 and 1, grid point 0.25: true value 0.75 mu0 + 0.25 mu1.  BoN at KL 0, 1.
    rng = np.random.default_rng(2024)
    p, repeats = 50, 200
    mu, nu = np.array([1.0, 3.0]), np.array([0.0, 1.0])
    truth = 0.75 * mu[0] + 0.25 * mu[1]
    gap_truth = truth - (0.75 * nu[0] + 0.25 * nu[1])
    kl = _const_kl([0.0, 1.0], 1, p)
    hits = gap_hits = 0
    for rep in range(repeats):
        difficulty = rng.normal(size=p)
        gold = mu[:, None, None] + difficulty + rng.normal(size=(2, 1, p))
        bon = nu[:, None] + difficulty + rng.normal(size=(2, p))
        res = bootstrap_frontier(kl, {"gold": gold}, [0.0, 1.0], {"gold": bon}, grid=[0.25],
                                 n_boot=300, rng=rep)
        hits += res.method.low[0, 0] <= truth <= res.method.high[0, 0]
        gap_hits += res.gap.low[0, 0] <= gap_truth <= res.gap.high[0, 0]
    assert 0.88 <= hits / repeats <= 0.99
    assert 0.88 <= gap_hits / repeats <= 0.99


def test_paired_gap_ci_is_narrower_than_unpaired():
    p = 300
    rng = np.random.default_rng(21)
    difficulty = rng.normal(size=p)  # shared across method and BoN: strong correlation
    gold = 1.0 + difficulty + 0.1 * rng.normal(size=(2, 1, p))
    bon = 0.5 + difficulty + 0.1 * rng.normal(size=(2, p))
    args = (_const_kl([0.0, 1.0], 1, p), {"gold": gold}, [0.0, 1.0], {"gold": bon})
    paired = bootstrap_frontier(*args, n_boot=3000, rng=8)
    unpaired = bootstrap_frontier(*args, n_boot=3000, rng=8, paired=False)
    width = lambda res: res.gap.high[0, 0] - res.gap.low[0, 0]  # noqa: E731
    assert width(paired) < 0.2 * width(unpaired)
    # closed forms: paired SE = sd(m - b) / sqrt(P); unpaired SE = sqrt(var m + var b) / sqrt(P)
    m, b = gold[0, 0], bon[0]
    assert paired.gap.se[0, 0] == pytest.approx((m - b).std() / np.sqrt(p), rel=0.07)
    assert unpaired.gap.se[0, 0] == pytest.approx(np.sqrt(m.var() + b.var()) / np.sqrt(p),
                                                  rel=0.07)
    assert paired.paired and not unpaired.paired


def test_metrics_are_bootstrapped_independently_of_each_other():
    kl, vals, bon_kl, bon_vals = _sweep_data(np.random.default_rng(4))
    both = bootstrap_frontier(kl, vals, bon_kl, bon_vals, n_boot=200, rng=9)
    for i, m in enumerate(("gold", "win_rate")):
        one = bootstrap_frontier(kl, {m: vals[m]}, bon_kl, {m: bon_vals[m]}, n_boot=200, rng=9)
        for field in ("estimate", "low", "high", "se"):
            np.testing.assert_allclose(getattr(both.gap, field)[i], getattr(one.gap, field)[0],
                                       rtol=1e-12, equal_nan=True)


def test_deterministic_given_seed():
    kl, vals, bon_kl, bon_vals = _sweep_data(np.random.default_rng(5))
    a = bootstrap_frontier(kl, vals, bon_kl, bon_vals, n_boot=300, rng=17)
    b = bootstrap_frontier(kl, vals, bon_kl, bon_vals, n_boot=300, rng=np.random.default_rng(17))
    c = bootstrap_frontier(kl, vals, bon_kl, bon_vals, n_boot=300, rng=18)
    for field in ("low", "high", "se"):
        np.testing.assert_array_equal(getattr(a.gap, field), getattr(b.gap, field))
    np.testing.assert_array_equal(a.boot_coverage, b.boot_coverage)
    finite = np.isfinite(a.gap.se)
    assert finite.any() and not np.array_equal(a.gap.se[finite], c.gap.se[finite])


def test_per_prompt_bon_kl():
    kl, vals, bon_kl, bon_vals = _sweep_data(np.random.default_rng(6))
    p = kl.shape[2]
    # constant over prompts: same as the (N,) form (KLs kept exact, so every point is covered)
    const = bootstrap_frontier(kl, vals, np.repeat(bon_kl[:, None], p, axis=1), bon_vals,
                               n_boot=100, rng=3, bon_kl_estimator=KL_BON_TIES)
    flat = bootstrap_frontier(kl, vals, bon_kl, bon_vals, n_boot=100, rng=3)
    np.testing.assert_allclose(const.bon.se, flat.bon.se, rtol=1e-12)
    np.testing.assert_array_equal(const.bon_boot_coverage, 1.0)
    assert const.bon_kl_estimator == KL_BON_TIES
    # varying over prompts: the mean is the grid; resampled, the top point is often uncovered
    noisy = bon_kl[:, None] * np.exp(0.2 * np.random.default_rng(7).normal(size=(bon_kl.size, p)))
    res = bootstrap_frontier(kl, vals, noisy, bon_vals, n_boot=400, rng=3)
    np.testing.assert_allclose(res.grid, noisy.mean(axis=1), rtol=1e-13)
    np.testing.assert_allclose(res.bon.estimate[0], bon_vals["gold"].mean(axis=1), rtol=1e-12)
    assert res.bon_boot_coverage[0] == 1.0 and 0.2 < res.bon_boot_coverage[-1] < 0.8
    held = bootstrap_frontier(kl, vals, noisy, bon_vals, n_boot=400, rng=3, resample_bon_kl=False)
    np.testing.assert_array_equal(held.bon_boot_coverage, 1.0)


def test_to_columns_long_format():
    kl, vals, bon_kl, bon_vals = _sweep_data(np.random.default_rng(8))
    res = bootstrap_frontier(kl, vals, bon_kl, bon_vals, n_boot=50, rng=0)
    cols = res.to_columns()
    g = bon_kl.size
    assert all(len(c) == 2 * g for c in cols.values())
    assert cols["metric"].tolist() == ["gold"] * g + ["win_rate"] * g
    np.testing.assert_array_equal(cols["kl"], np.tile(bon_kl, 2))
    np.testing.assert_array_equal(cols["gap_se"][g:], res.gap.se[1])
    assert set(cols["kl_estimator"]) == {KL_K1}


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"kl": np.zeros((2, 3))}, "kl must be 3-D"),
        ({"values": {"gold": np.zeros((2, 1, 5))}}, r"values\['gold'\] must have shape"),
        ({"bon_values": {"win": np.zeros((2, 4))}}, "same metrics"),
        ({"bon_values": {"gold": np.zeros((2, 5))}}, r"bon_values\['gold'\] must have shape"),
        ({"bon_kl": np.zeros((2, 5))}, r"bon_kl must be \(N,\) or \(N, P\)"),
        ({"values": {}}, "non-empty mapping"),
        ({"n_boot": 1}, "n_boot"),
        ({"level": 1.0}, "level"),
        ({"kl_estimator": "k2"}, "unknown KL estimator"),
        ({"rng": 1.5}, "rng must be"),
    ],
)
def test_bootstrap_rejects_bad_input(change, match):
    kwargs = {"kl": np.zeros((2, 1, 4)), "values": {"gold": np.zeros((2, 1, 4))},
              "bon_kl": [0.0, 1.0], "bon_values": {"gold": np.zeros((2, 4))}, "n_boot": 10}
    kwargs.update(change)
    with pytest.raises(ValueError, match=match):
        bootstrap_frontier(**kwargs)


def test_kl_estimator_names():
    assert set(KL_ESTIMATORS) == {KL_K1, KL_K3, KL_ANALYTIC_BON, KL_BON_TIES}
    assert check_kl_estimator("k3") == "k3"
    with pytest.raises(ValueError, match="unknown KL estimator"):
        check_kl_estimator("analytic")


# ---------------------------------------------------------------------------------------------
# Pareto flags
# ---------------------------------------------------------------------------------------------


def test_pareto_flags_hand_made():
    #            A    B    C    D    E    F (copy of B)
    kl = [0.0, 1.0, 2.0, 1.0, 3.0, 1.0]
    value = [0.0, 1.0, 0.5, 0.9, 2.0, 1.0]
    # C: B has lower KL, higher value; D: B has equal KL, higher value; B, F identical
    assert pareto_flags(kl, value).tolist() == [True, True, False, False, True, True]


def test_pareto_flags_matches_winrate_pareto_frontier_with_ties():
    rng = np.random.default_rng(30)
    for _ in range(50):
        n = int(rng.integers(1, 25))
        kl, value = rng.integers(0, 5, size=n), rng.integers(0, 5, size=n)
        np.testing.assert_array_equal(pareto_flags(kl, value), pareto_frontier(kl, value))


def test_pareto_flags_se_with_zero_z_or_zero_se_is_plain():
    rng = np.random.default_rng(31)
    for _ in range(50):
        n = int(rng.integers(1, 25))
        kl, value = rng.integers(0, 5, size=n) / 2, rng.integers(0, 5, size=n) / 2
        se, kse = rng.uniform(0, 1, size=n), rng.uniform(0, 1, size=n)
        plain = pareto_flags(kl, value)
        np.testing.assert_array_equal(pareto_flags_se(kl, value, se, kse, z=0.0), plain)
        np.testing.assert_array_equal(pareto_flags_se(kl, value, z=3.0), plain)


def test_pareto_flags_se_hand_made():
    #         A    B    C    D     E
    kl = [0.0, 1.0, 2.0, 1.5, 3.0]
    value = [0.0, 1.0, 0.9, 0.5, 2.0]
    se = [0.1, 0.1, 0.1, 0.01, 0.1]
    assert pareto_flags(kl, value).tolist() == [True, True, False, False, True]
    # C trails B by 0.1 < 1.96·sqrt(0.1² + 0.1²) = 0.277: kept.
    # D trails B by 0.5 > 1.96·sqrt(0.1² + 0.01²) = 0.197: dominated.
    assert pareto_flags_se(kl, value, se, z=1.96).tolist() == [True, True, True, False, True]
    # with a large enough z nothing is confidently dominated
    assert pareto_flags_se(kl, value, se, z=5.0).all()


def test_pareto_flags_se_kl_uncertainty():
    kl, value = [1.0, 1.1], [2.0, 1.0]  # point 0 dominates point 1 if KL is known
    assert pareto_flags_se(kl, value, [0.0, 0.0], z=1.0).tolist() == [True, False]
    # KL gap 0.1 < 1·sqrt(0.1² + 0.1²): point 0 is not confidently at lower KL
    assert pareto_flags_se(kl, value, [0.0, 0.0], [0.1, 0.1], z=1.0).tolist() == [True, True]
    assert pareto_flags_se(kl, value, [0.0, 0.0], [0.01, 0.01], z=1.0).tolist() == [True, False]


def test_pareto_flags_se_brute_force_and_monotone_in_z():
    rng = np.random.default_rng(32)
    for _ in range(30):
        n = int(rng.integers(2, 15))
        kl, value = rng.uniform(0, 3, n), rng.uniform(0, 3, n)
        se, kse = rng.uniform(0, 0.3, n), rng.uniform(0, 0.3, n)
        z = float(rng.uniform(0, 3))
        expected = np.ones(n, dtype=bool)
        for i in range(n):
            for j in range(n):
                if i == j:
                    continue
                dk = kl[j] + z * np.hypot(kse[i], kse[j]) - kl[i]  # <= 0: j confidently lower
                dv = value[j] - z * np.hypot(se[i], se[j]) - value[i]  # >= 0: j confidently higher
                if dk <= 0 and dv >= 0 and (dk < 0 or dv > 0):
                    expected[i] = False
        got = pareto_flags_se(kl, value, se, kse, z=z)
        np.testing.assert_array_equal(got, expected)
        # a larger z can only keep more points
        assert (pareto_flags_se(kl, value, se, kse, z=z + 1.0) >= got).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"value_se": [-0.1, 0.1]}, "value_se must be >= 0"),
        ({"kl_se": [0.1]}, r"kl_se must have shape \(2,\)"),
        ({"value_se": [np.nan, 0.1]}, "value_se must contain only finite"),
        ({"z": -1.0}, "z must be finite and >= 0"),
    ],
)
def test_pareto_flags_se_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pareto_flags_se([0.0, 1.0], [0.0, 1.0], **kwargs)


@pytest.mark.parametrize(("level", "z"), [(0.95, 1.959964), (0.80, 1.281552)])
def test_percentile_interval_width_matches_normal_quantile(level, z):
    # a mean over many prompts is close to normal: the percentile interval is ±z·SE around it
    p = 500
    rng = np.random.default_rng(40)
    gold = rng.exponential(size=(2, 1, p))
    res = bootstrap_frontier(_const_kl([0.0, 1.0], 1, p), {"gold": gold}, [0.0, 1.0],
                             {"gold": np.zeros((2, p))}, n_boot=4000, rng=2, level=level)
    low, high, se = res.method.low[0, 0], res.method.high[0, 0], res.method.se[0, 0]
    assert (high - low) / (2 * se) == pytest.approx(z, rel=0.05)
    assert low < res.method.estimate[0, 0] < high
    assert res.level == level
