import numpy as np
import pytest

from pipeline_lib.math.cdf import (
    batched_empirical_cdf,
    cdf_at_or_below,
    cdf_below,
    empirical_cdf,
    fit_log_cdf,
    group_sorted_matrix,
    self_cdf_matrix,
    tie_mass,
)


def test_empirical_cdf_hand_computed():
    s = np.array([1.0, 2.0, 2.0, 5.0])  # M = 4
    q = np.array([0.0, 1.0, 1.5, 2.0, 3.0, 5.0, 9.0])
    # (1 + #{s < q}) / 5
    expected = np.array([1, 1, 2, 2, 4, 4, 5]) / 5.0
    np.testing.assert_allclose(empirical_cdf(s, q), expected)


def test_empirical_cdf_bounds_and_log_finite():
    rng = np.random.default_rng(0)
    s = np.sort(rng.normal(size=50))
    q = rng.normal(scale=10, size=1000)
    f = empirical_cdf(s, q)
    assert f.min() >= 1 / 51 and f.max() <= 1.0
    assert np.isfinite(np.log(f)).all()
    # the smallest cached reward gets the floor 1/(M+1), anything above all gets 1
    assert empirical_cdf(s, s[:1])[0] == pytest.approx(1 / 51)
    assert empirical_cdf(s, [s[-1] + 1])[0] == 1.0


def test_empirical_cdf_monotone():
    s = np.sort(np.random.default_rng(1).integers(0, 5, size=20).astype(float))
    q = np.linspace(-1, 6, 200)
    assert np.all(np.diff(empirical_cdf(s, q)) >= 0)


def test_ties_below_at_and_mass():
    s = np.array([0.0, 1.0, 1.0, 1.0, 3.0])
    np.testing.assert_allclose(cdf_below(s, [1.0]), [1 / 5])
    np.testing.assert_allclose(cdf_at_or_below(s, [1.0]), [4 / 5])
    np.testing.assert_allclose(tie_mass(s, [1.0, 2.0, 3.0]), [3 / 5, 0.0, 1 / 5])
    # F(r) - F-(r) summed over the distinct values is 1
    assert tie_mass(s, np.unique(s)).sum() == pytest.approx(1.0)


def test_rejects_bad_sorted_input():
    with pytest.raises(ValueError, match="non-empty 1-D"):
        empirical_cdf(np.array([]), [1.0])
    with pytest.raises(ValueError, match="non-empty 1-D"):
        empirical_cdf(np.zeros((2, 2)), [1.0])


def test_group_sorted_matrix_and_counts():
    codes = np.array([1, 0, 1, 0, 1, 0])
    rewards = np.array([3.0, 2.0, 1.0, 9.0, 2.0, 0.0])
    m = group_sorted_matrix(codes, rewards, n_groups=2, m=3)
    np.testing.assert_array_equal(m, [[0.0, 2.0, 9.0], [1.0, 2.0, 3.0]])
    with pytest.raises(ValueError, match="exactly M=3"):
        group_sorted_matrix(np.array([0, 0, 1]), np.array([1.0, 2.0, 3.0]), 2, 3)


def test_batched_and_self_cdf_match_per_prompt():
    rng = np.random.default_rng(2)
    mat = np.sort(rng.integers(0, 6, size=(7, 9)).astype(float), axis=1)  # many ties
    rows = rng.integers(0, 7, size=300)
    q = rng.integers(-1, 8, size=300).astype(float)
    expected = np.array([empirical_cdf(mat[r], [x])[0] for r, x in zip(rows, q, strict=True)])
    np.testing.assert_allclose(batched_empirical_cdf(mat, rows, q), expected)
    self_expected = np.stack([empirical_cdf(row, row) for row in mat])
    np.testing.assert_allclose(self_cdf_matrix(mat), self_expected)


def test_curvefit_recovers_smooth_cdf_and_falls_back():
    # rewards whose smoothed CDF follows log F = -a exp(-b r) - c closely (Gumbel quantiles)
    m = 200
    u = np.arange(1, m + 1) / (m + 1)
    r = np.sort(-np.log(-np.log(u)))  # Gumbel: log F(r) = -exp(-r)
    fit = fit_log_cdf(r)
    assert fit.ok
    assert fit.rmse < 0.05
    assert fit.b == pytest.approx(1.0, rel=0.15)
    np.testing.assert_allclose(fit.log_cdf(r), np.log(empirical_cdf(r, r)), atol=0.15)
    constant = fit_log_cdf(np.ones(10))
    assert not constant.ok and np.isnan(constant.a)


def test_row_counts_match_one_pool_per_query():
    """One counting helper: with a (B, M) matrix each query is counted against its own row,
    exactly as the 1-D form counts it against that row alone (ties included)."""
    from pipeline_lib.math.cdf import count_at_or_below, count_below

    rng = np.random.default_rng(3)
    rows = np.sort(rng.integers(0, 5, size=(40, 7)).astype(float), axis=1)  # many ties
    queries = rng.integers(-1, 6, size=40).astype(float)
    below, at_or_below = count_below(rows, queries), count_at_or_below(rows, queries)
    for i in range(40):
        assert below[i] == count_below(rows[i], queries[i : i + 1])[0] == (rows[i] < queries[i]).sum()
        assert at_or_below[i] == count_at_or_below(rows[i], queries[i : i + 1])[0]
    with pytest.raises(ValueError, match="must match"):
        count_below(rows, queries[:3])
