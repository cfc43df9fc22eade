"""Unit tests for pipeline_lib.math.bon, .winrate and .kl: brute-force enumeration, closed forms, hand cases."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest

from pipeline_lib.math.bon import bon_curve, bon_kl, bon_kl_ties, bon_kl_ties_batch, bon_weights
from pipeline_lib.math.kl import k3_token_mean, kl_k1, mean_and_se
from pipeline_lib.math.winrate import (
    bon_win_rate,
    pareto_frontier,
    win_rate,
    win_rate_per_prompt,
    win_rate_vs_bon,
)

# --------------------------------------------------------------------------------------------
# brute-force references
# --------------------------------------------------------------------------------------------


def _selected_members(proxy_row: np.ndarray, subset: tuple[int, ...]) -> list[int]:
    """Members of the subset that attain the subset's max proxy (uniform tie-breaking)."""
    best = max(proxy_row[j] for j in subset)
    return [j for j in subset if proxy_row[j] == best]


def brute_bon_curve(proxy: np.ndarray, gold: np.ndarray, n: int) -> tuple[float, float]:
    """Enumerate all n-subsets; in each, average gold over the members tied at the max proxy."""
    exp_proxy, exp_gold = [], []
    for p in range(proxy.shape[0]):
        sp, sg = [], []
        for subset in itertools.combinations(range(proxy.shape[1]), n):
            sel = _selected_members(proxy[p], subset)
            sp.append(proxy[p, sel[0]])
            sg.append(np.mean(gold[p, sel]))
        exp_proxy.append(np.mean(sp))
        exp_gold.append(np.mean(sg))
    return float(np.mean(exp_proxy)), float(np.mean(exp_gold))


def brute_win_vs_bon(policy: np.ndarray, proxy: np.ndarray, gold: np.ndarray, n: int) -> float:
    per_prompt = []
    for p in range(proxy.shape[0]):
        vals = []
        for subset in itertools.combinations(range(proxy.shape[1]), n):
            sel = _selected_members(proxy[p], subset)
            wins = [
                np.mean((policy[p] > gold[p, j]) + 0.5 * (policy[p] == gold[p, j])) for j in sel
            ]
            vals.append(np.mean(wins))
        per_prompt.append(np.mean(vals))
    return float(np.mean(per_prompt))


def brute_win_rate(policy: np.ndarray, reference: np.ndarray) -> np.ndarray:
    a, b = policy[:, :, None], reference[:, None, :]
    return ((a > b) + 0.5 * (a == b)).mean(axis=(1, 2))


def brute_kl_ties(rewards: np.ndarray, n: int) -> float:
    """KL of max-of-n i.i.d. draws (with replacement) from the empirical distribution."""
    m = len(rewards)
    values = sorted(set(rewards.tolist()))
    q = {v: Fraction(int((rewards == v).sum()), m) for v in values}
    pb = dict.fromkeys(values, Fraction(0))
    for tup in itertools.product(range(m), repeat=n):
        pb[max(rewards[j] for j in tup)] += Fraction(1, m**n)
    return sum(float(pb[v]) * math.log(pb[v] / q[v]) for v in values if pb[v] > 0)


def _pool(rng: np.random.Generator, p: int, m: int, ties: bool) -> tuple[np.ndarray, np.ndarray]:
    if ties:
        return (
            rng.integers(0, 3, size=(p, m)).astype(float),
            rng.integers(0, 4, size=(p, m)).astype(float),
        )
    return rng.normal(size=(p, m)), rng.normal(size=(p, m))


# --------------------------------------------------------------------------------------------
# bon_weights
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [1, 2, 7, 50, 12600])
def test_bon_weights_rows_sum_to_one_and_vanish_below_n(m: int) -> None:
    ns = sorted({n for n in (1, 2, m // 3, m - 1, m) if 1 <= n <= m})
    w = bon_weights(m, ns)
    assert w.shape == (len(ns), m)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
    assert (w >= 0).all()
    for a, n in enumerate(ns):
        assert (w[a, : n - 1] == 0).all()
        assert w[a, n - 1 :].min() >= 0
        # the top rank is the best of n with probability n/M
        assert w[a, -1] == pytest.approx(n / m, rel=1e-10)


def test_bon_weights_match_exact_binomials() -> None:
    m = 40
    w = bon_weights(m, range(1, m + 1))
    exact = np.array(
        [
            [float(Fraction(math.comb(i - 1, n - 1), math.comb(m, n))) for i in range(1, m + 1)]
            for n in range(1, m + 1)
        ]
    )
    np.testing.assert_allclose(w, exact, rtol=1e-12, atol=1e-300)


def test_bon_weights_large_m_no_overflow() -> None:
    m = 12600
    ns = [1, 2, 50, 6300, 12599, 12600]
    w = bon_weights(m, ns)
    assert np.isfinite(w).all()
    for a, n in enumerate(ns):
        for i in (n, (n + m) // 2, m):
            exact = float(Fraction(math.comb(i - 1, n - 1), math.comb(m, n)))
            if exact > 1e-250:
                assert w[a, i - 1] == pytest.approx(exact, rel=1e-9)


# --------------------------------------------------------------------------------------------
# bon_curve
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("m", [1, 2, 5, 8])
def test_bon_curve_matches_subset_enumeration(m: int, seed: int, ties: bool) -> None:
    rng = np.random.default_rng(1000 * seed + m)
    proxy, gold = _pool(rng, 4, m, ties)
    ns = list(range(1, m + 1))
    got_proxy, got_gold = bon_curve(proxy, gold, ns)
    expected = np.array([brute_bon_curve(proxy, gold, n) for n in ns])
    np.testing.assert_allclose(got_proxy, expected[:, 0], rtol=0, atol=1e-10)
    np.testing.assert_allclose(got_gold, expected[:, 1], rtol=0, atol=1e-10)


def test_bon_curve_ties_are_averaged_not_broken() -> None:
    # subsets of 2: {0,1} -> gold 0; {0,2} -> gold 2; {1,2} tie at proxy 1 -> (0 + 2)/2 = 1.
    proxy = np.array([[0.0, 1.0, 1.0]])
    gold = np.array([[5.0, 0.0, 2.0]])
    got_proxy, got_gold = bon_curve(proxy, gold, [1, 2, 3])
    np.testing.assert_allclose(got_gold, [7.0 / 3.0, 1.0, 1.0], atol=1e-14)
    np.testing.assert_allclose(got_proxy, [2.0 / 3.0, 1.0, 1.0], atol=1e-14)
    # permuting columns (i.e. the arbitrary order inside a tie block) changes nothing
    perm = [2, 1, 0]
    got_proxy2, got_gold2 = bon_curve(proxy[:, perm], gold[:, perm], [1, 2, 3])
    np.testing.assert_allclose(got_gold2, got_gold, atol=1e-14)
    np.testing.assert_allclose(got_proxy2, got_proxy, atol=1e-14)


def test_bon_curve_all_tied_proxy_gives_mean_gold_for_every_n() -> None:
    rng = np.random.default_rng(3)
    gold = rng.normal(size=(3, 9))
    _, got_gold = bon_curve(np.zeros((3, 9)), gold, range(1, 10))
    np.testing.assert_allclose(got_gold, gold.mean(), atol=1e-12)


def test_bon_curve_uniform_quantiles_closed_form() -> None:
    # Pool = the M uniform quantiles (i - 1/2)/M, shuffled; proxy = gold.
    # Exactly E = (E[rank of best] - 1/2)/M with E[rank] = n (M + 1)/(n + 1); -> n/(n + 1).
    m = 20000
    rng = np.random.default_rng(4)
    u = rng.permutation((np.arange(1, m + 1) - 0.5) / m)[None, :]
    ns = np.array([1, 2, 8, 100, 5000, m])
    got_proxy, got_gold = bon_curve(u, u, ns)
    exact = (ns * (m + 1) / (ns + 1) - 0.5) / m
    np.testing.assert_allclose(got_proxy, exact, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got_gold, exact, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got_proxy, ns / (ns + 1), atol=1e-4)


def test_bon_curve_endpoints() -> None:
    rng = np.random.default_rng(5)
    proxy, gold = _pool(rng, 6, 30, ties=True)
    got_proxy, got_gold = bon_curve(proxy, gold, [1, 30])
    assert got_proxy[0] == pytest.approx(proxy.mean(), abs=1e-12)
    assert got_gold[0] == pytest.approx(gold.mean(), abs=1e-12)
    assert got_proxy[1] == pytest.approx(proxy.max(axis=1).mean(), abs=1e-12)
    top_gold = [gold[p, proxy[p] == proxy[p].max()].mean() for p in range(6)]
    assert got_gold[1] == pytest.approx(np.mean(top_gold), abs=1e-12)


def test_bon_curve_ns_order_duplicates_and_scalar() -> None:
    rng = np.random.default_rng(6)
    proxy, gold = _pool(rng, 5, 40, ties=True)
    ns = [40, 3, 17, 3, 1]
    got_proxy, got_gold = bon_curve(proxy, gold, ns)
    for a, n in enumerate(ns):
        single = bon_curve(proxy, gold, n)
        assert got_proxy[a] == pytest.approx(single[0][0], abs=1e-13)
        assert got_gold[a] == pytest.approx(single[1][0], abs=1e-13)
    assert got_proxy[1] == got_proxy[3]
    empty = bon_curve(proxy, gold, [])
    assert empty[0].shape == (0,) and empty[1].shape == (0,)


def test_bon_curve_is_monotone_in_n_for_proxy() -> None:
    rng = np.random.default_rng(7)
    proxy, gold = _pool(rng, 8, 300, ties=False)
    got_proxy, _ = bon_curve(proxy, gold, range(1, 301))
    assert (np.diff(got_proxy) >= -1e-12).all()


def test_bon_curve_tail_truncation_is_below_roundoff() -> None:
    rng = np.random.default_rng(8)
    m = 3000
    proxy = np.round(rng.normal(size=(16, m)), 2)  # many ties
    gold = proxy + rng.normal(size=(16, m))
    ns = np.arange(1, m + 1)
    fast = bon_curve(proxy, gold, ns)
    full = bon_curve(proxy, gold, ns, tail_tol=0.0)
    np.testing.assert_allclose(fast[0], full[0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(fast[1], full[1], rtol=0, atol=1e-12)


def test_bon_curve_matches_weight_matrix_product() -> None:
    rng = np.random.default_rng(9)
    proxy, gold = _pool(rng, 3, 25, ties=False)
    ns = [1, 4, 25]
    order = np.argsort(proxy, axis=1)
    sp = np.take_along_axis(proxy, order, axis=1)
    sg = np.take_along_axis(gold, order, axis=1)
    w = bon_weights(25, ns)
    got_proxy, got_gold = bon_curve(proxy, gold, ns)
    np.testing.assert_allclose(got_proxy, (sp @ w.T).mean(axis=0), atol=1e-13)
    np.testing.assert_allclose(got_gold, (sg @ w.T).mean(axis=0), atol=1e-13)


@pytest.mark.parametrize(
    ("proxy", "gold", "ns", "match"),
    [
        (np.zeros((2, 3)), np.zeros((2, 4)), [1], "same shape"),
        (np.zeros(3), np.zeros(3), [1], "proxy must be 2-D"),
        (np.zeros((2, 3)), np.zeros(3), [1], "gold must be 2-D"),
        (np.array([[0.0, np.nan]]), np.zeros((1, 2)), [1], "proxy must contain only finite"),
        (np.zeros((1, 2)), np.array([[np.inf, 0.0]]), [1], "gold must contain only finite"),
        (np.zeros((1, 3)), np.zeros((1, 3)), [0], "ns must satisfy 1 <= n <= M = 3"),
        (np.zeros((1, 3)), np.zeros((1, 3)), [4], "ns must satisfy 1 <= n <= M = 3"),
        (np.zeros((1, 3)), np.zeros((1, 3)), [1.5], "ns must contain integers"),
        (np.zeros((1, 3)), np.zeros((1, 3)), [[1, 2]], "ns must be"),
        (np.zeros((0, 3)), np.zeros((0, 3)), [1], "proxy must not be empty"),
    ],
)
def test_bon_curve_validation(proxy, gold, ns, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        bon_curve(proxy, gold, ns)


def test_bon_curve_tail_tol_validation_and_weights_validation() -> None:
    with pytest.raises(ValueError, match="tail_tol"):
        bon_curve(np.zeros((1, 3)), np.zeros((1, 3)), [1], tail_tol=1.0)
    with pytest.raises(ValueError, match="M must be a positive integer"):
        bon_weights(0, [1])
    with pytest.raises(ValueError, match="ns must satisfy"):
        bon_weights(5, [6])


# --------------------------------------------------------------------------------------------
# BoN KL
# --------------------------------------------------------------------------------------------


def test_bon_kl_values() -> None:
    assert bon_kl(1) == 0.0
    assert bon_kl(2) == pytest.approx(math.log(2) - 0.5, abs=1e-15)
    assert isinstance(bon_kl(8), float)
    np.testing.assert_allclose(
        bon_kl(np.array([1, 4, 16])), np.log([1, 4, 16]) - np.array([0, 3 / 4, 15 / 16])
    )
    with pytest.raises(ValueError, match="n must be"):
        bon_kl(0.5)


def test_bon_kl_ties_continuous_limit_approaches_analytic() -> None:
    rng = np.random.default_rng(10)
    rewards = rng.normal(size=20000)  # all distinct
    for n in (1, 2, 4, 8, 32):
        got = bon_kl_ties(rewards, n)
        assert got <= bon_kl(n) + 1e-12
        assert got == pytest.approx(bon_kl(n), abs=1e-6)


def test_bon_kl_ties_all_tied_is_zero() -> None:
    for n in (1, 2, 50):
        assert bon_kl_ties(np.full(17, 0.3), n) == 0.0


def test_bon_kl_ties_hand_case() -> None:
    # rewards {0, 0, 1}, n = 2: q = (2/3, 1/3); p = ((2/3)^2, 1 - (2/3)^2) = (4/9, 5/9)
    expected = 4 / 9 * math.log((4 / 9) / (2 / 3)) + 5 / 9 * math.log((5 / 9) / (1 / 3))
    assert bon_kl_ties([0.0, 0.0, 1.0], 2) == pytest.approx(expected, abs=1e-14)
    # and the order of the cached samples does not matter
    assert bon_kl_ties([1.0, 0.0, 0.0], 2) == pytest.approx(expected, abs=1e-14)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bon_kl_ties_matches_enumeration_and_is_below_analytic(seed: int) -> None:
    rng = np.random.default_rng(20 + seed)
    rewards = rng.integers(0, 3, size=5).astype(float)
    for n in (1, 2, 3, 4):
        got = bon_kl_ties(rewards, n)
        assert got == pytest.approx(brute_kl_ties(rewards, n), abs=1e-12)
        assert got <= bon_kl(n) + 1e-12


def test_bon_kl_ties_batch_is_mean_of_prompts() -> None:
    rng = np.random.default_rng(11)
    rewards = np.round(rng.normal(size=(6, 40)), 1)
    ns = [1, 2, 8, 1000]  # n may exceed M: BoN here samples with replacement
    got = bon_kl_ties_batch(rewards, ns)
    assert got.shape == (4,)
    expected = [np.mean([bon_kl_ties(r, n) for r in rewards]) for n in ns]
    np.testing.assert_allclose(got, expected, atol=1e-13)
    assert got[0] == 0.0
    assert (got <= bon_kl(np.array(ns)) + 1e-12).all()


def test_bon_kl_ties_validation() -> None:
    with pytest.raises(ValueError, match="rewards must be 1-D"):
        bon_kl_ties(np.zeros((2, 2)), 2)
    with pytest.raises(ValueError, match="n must satisfy"):
        bon_kl_ties([1.0, 2.0], 0)
    with pytest.raises(ValueError, match="rewards_2d must be 2-D"):
        bon_kl_ties_batch([1.0, 2.0], [2])


# --------------------------------------------------------------------------------------------
# win rates
# --------------------------------------------------------------------------------------------


def test_win_rate_hand_case_with_ties() -> None:
    # pairs: (1 vs 1) tie 0.5, (1 vs 3) 0, (2 vs 1) 1, (2 vs 3) 0 -> 1.5 / 4
    assert win_rate([[1.0, 2.0]], [[1.0, 3.0]]) == pytest.approx(0.375, abs=1e-15)
    np.testing.assert_allclose(
        win_rate_per_prompt([[1.0, 2.0], [5.0, 5.0]], [[1.0, 3.0], [5.0, 4.0]]), [0.375, 0.75]
    )


def test_win_rate_identical_distributions_is_half() -> None:
    rng = np.random.default_rng(12)
    x = rng.integers(0, 5, size=(7, 30)).astype(float)
    np.testing.assert_allclose(win_rate_per_prompt(x, x), 0.5, atol=1e-15)
    y = rng.normal(size=(7, 30))
    assert win_rate(y, y) == pytest.approx(0.5, abs=1e-15)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_win_rate_matches_all_pairs(seed: int) -> None:
    rng = np.random.default_rng(30 + seed)
    k, m = rng.integers(1, 9), rng.integers(1, 12)
    pol = rng.integers(0, 4, size=(5, k)).astype(float)
    ref = rng.integers(0, 4, size=(5, m)).astype(float)
    np.testing.assert_allclose(win_rate_per_prompt(pol, ref), brute_win_rate(pol, ref), atol=1e-14)
    assert win_rate(pol, ref) + win_rate(ref, pol) == pytest.approx(1.0, abs=1e-14)


def test_win_rate_validation() -> None:
    with pytest.raises(ValueError, match="same number of prompts"):
        win_rate(np.zeros((2, 3)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="policy_scores must be 2-D"):
        win_rate(np.zeros(3), np.zeros((1, 3)))
    with pytest.raises(ValueError, match="reference_scores must contain only finite"):
        win_rate(np.zeros((1, 3)), np.array([[0.0, np.nan]]))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_win_rate_vs_bon_matches_subset_enumeration(seed: int, ties: bool) -> None:
    rng = np.random.default_rng(40 + seed)
    m = 7
    proxy, gold = _pool(rng, 3, m, ties)
    policy = rng.integers(0, 4, size=(3, 5)).astype(float) if ties else rng.normal(size=(3, 5))
    if not ties:
        policy[:, 0] = gold[:, 0]  # exact ties with pool responses even in the continuous case
    for n in range(1, m + 1):
        got = win_rate_vs_bon(policy, proxy, gold, n)
        assert got == pytest.approx(brute_win_vs_bon(policy, proxy, gold, n), abs=1e-12)


def test_win_rate_vs_bon_of_one_is_plain_win_rate() -> None:
    rng = np.random.default_rng(13)
    proxy, gold = _pool(rng, 4, 20, ties=True)
    policy = rng.integers(0, 4, size=(4, 6)).astype(float)
    assert win_rate_vs_bon(policy, proxy, gold, 1) == pytest.approx(
        win_rate(policy, gold), abs=1e-14
    )


def test_win_rate_reference_vs_bon_closed_form() -> None:
    # Continuous, proxy = gold, policy = the pool itself: P(ref > BoN_n) + ½P(tie)
    #   = (M + 1/2 - E[rank of best]) / M, E[rank] = n (M + 1)/(n + 1)  ->  1/(n + 1),
    # i.e. BoN beats the reference n/(n + 1) of the time (0.889 at n = 8).
    m = 5000
    rng = np.random.default_rng(14)
    pool = rng.normal(size=(1, m))
    for n in (1, 2, 8, 64):
        got = win_rate_vs_bon(pool, pool, pool, n)
        exact = (m + 0.5 - n * (m + 1) / (n + 1)) / m
        assert got == pytest.approx(exact, abs=1e-12)
        assert got == pytest.approx(1 / (n + 1), abs=1e-3)
    assert 1 - win_rate_vs_bon(pool, pool, pool, 8) == pytest.approx(8 / 9, abs=1e-3)


def test_win_rate_vs_bon_validation() -> None:
    z = np.zeros((2, 4))
    with pytest.raises(ValueError, match="reference_proxy and reference_gold must have the same"):
        win_rate_vs_bon(z, z, np.zeros((2, 5)), 1)
    with pytest.raises(ValueError, match="n must satisfy 1 <= n <= M = 4"):
        win_rate_vs_bon(z, z, z, 5)
    with pytest.raises(ValueError, match="same number of prompts"):
        win_rate_vs_bon(np.zeros((3, 4)), z, z, 2)


# --------------------------------------------------------------------------------------------
# bon_win_rate: the reference's best-of-n against held-out judges
# --------------------------------------------------------------------------------------------


def brute_bon_win_rate(proxy: np.ndarray, gold: np.ndarray, judges: np.ndarray, n: int) -> float:
    """Every n-subset of the pool; the members tied at its max proxy share the pick; each pick
    against every judge, ties 1/2; mean over subsets, judges and prompts."""
    per_prompt = []
    for p in range(proxy.shape[0]):
        vals = []
        for subset in itertools.combinations(range(proxy.shape[1]), n):
            sel = _selected_members(proxy[p], subset)
            vals.append(np.mean([np.mean((gold[p, j] > judges[p]) + 0.5 * (gold[p, j] == judges[p]))
                                 for j in sel]))
        per_prompt.append(np.mean(vals))
    return float(np.mean(per_prompt))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_bon_win_rate_matches_subset_enumeration(seed: int, ties: bool) -> None:
    rng = np.random.default_rng(60 + seed)
    proxy, gold = _pool(rng, 3, 7, ties)
    judges = rng.integers(0, 4, size=(3, 4)).astype(float) if ties else rng.normal(size=(3, 4))
    if not ties:
        judges[:, 0] = gold[:, 2]  # a judge tied with a pooled response
    for n in range(1, 8):
        got = bon_win_rate(proxy, gold, judges, n)
        assert got == pytest.approx(brute_bon_win_rate(proxy, gold, judges, n), abs=1e-12)


@pytest.mark.parametrize("pool_size", [1, 2, 5, 13, 64])
def test_bon_win_rate_is_n_over_n_plus_1_exactly_in_expectation(pool_size: int) -> None:
    """Continuous rewards, proxy = gold, a judge independent of the pool: by exchangeability
    the judge's rank among the L + 1 values is uniform on 0..L. With k pool values below it,
    the best of an n-subset beats it unless the whole subset lies among those k:
    1 - C(k, n)/C(L, n). Averaged over k = 0..L (hockey stick: Σ_k C(k, n) = C(L+1, n+1)):
    1 - C(L+1, n+1)/((L+1) C(L, n)) = 1 - 1/(n+1) = n/(n+1). One judge at every rank is that
    expectation, computed exactly (no Monte Carlo); e.g. 8/9 at n = 8."""
    pool = np.arange(1.0, pool_size + 1)[None, :]
    judges = np.arange(pool_size + 1)[None, :] + 0.5  # one judge at each of the L + 1 ranks
    for n in range(1, pool_size + 1):
        exact = Fraction(n, n + 1)
        per_rank = [1 - Fraction(math.comb(k, n), math.comb(pool_size, n))
                    for k in range(pool_size + 1)]
        assert sum(per_rank) / (pool_size + 1) == exact  # the closed form, in rationals
        assert bon_win_rate(pool, pool, judges, n) == pytest.approx(float(exact), abs=1e-12)
        # the same with the pool shuffled and a proxy that is a monotone map of gold
        order = np.random.default_rng(n).permutation(pool_size)
        assert bon_win_rate(np.exp(pool[:, order]), pool[:, order], judges, n) == pytest.approx(
            float(exact), abs=1e-12)


def test_bon_win_rate_is_the_rate_of_bon_not_of_the_judges() -> None:
    """n = 8 against independent judges: 8/9, not its complement 1/9 (a dropped `1 -`); the
    pool judged against itself instead (the old estimator) is biased: 0.895 at M = 64."""
    m = 64
    pool = np.arange(1.0, m + 1)[None, :]
    judges = np.arange(m + 1)[None, :] + 0.5
    assert bon_win_rate(pool, pool, judges, 8) == pytest.approx(8 / 9, abs=1e-12)
    assert 1 - bon_win_rate(pool, pool, judges, 8) == pytest.approx(1 / 9, abs=1e-12)
    self_judged = 1 - win_rate_vs_bon(pool, pool, pool, 8)
    assert self_judged == pytest.approx(1 - (m + 0.5 - 8 * (m + 1) / 9) / m, abs=1e-12)
    assert self_judged == pytest.approx(0.895, abs=5e-4) and abs(self_judged - 8 / 9) > 5e-3


def test_bon_win_rate_of_one_is_the_pool_s_plain_win_rate_ties_included() -> None:
    """n = 1 picks a uniform pool member: the BoN point's rate is the pool's win rate against
    the judges, with ties at 1/2 exactly as a policy's win_rate_ref counts them."""
    rng = np.random.default_rng(61)
    proxy, gold = _pool(rng, 4, 9, ties=True)
    judges = rng.integers(0, 4, size=(4, 3)).astype(float)
    assert bon_win_rate(proxy, gold, judges, 1) == pytest.approx(win_rate(gold, judges), abs=1e-14)
    # all tied: 1/2 for every n
    flat = np.ones((2, 5))
    for n in range(1, 6):
        assert bon_win_rate(flat, flat, np.ones((2, 3)), n) == pytest.approx(0.5, abs=1e-14)


def test_bon_win_rate_validation() -> None:
    z = np.zeros((2, 4))
    with pytest.raises(ValueError, match="n must satisfy 1 <= n <= M = 4"):
        bon_win_rate(z, z, np.zeros((2, 3)), 5)
    with pytest.raises(ValueError, match="same number of prompts"):
        bon_win_rate(z, z, np.zeros((3, 3)), 2)


# --------------------------------------------------------------------------------------------
# KL estimators from samples
# --------------------------------------------------------------------------------------------


def k1_mean_se(logp_policy, logp_ref):
    """The k1 estimate of sequence log-probs with its standard error, as `evaluate` reports it."""
    return mean_and_se(kl_k1(logp_policy, logp_ref))


def test_kl_k1_mean_and_standard_error() -> None:
    pol = np.array([-1.0, -2.0, -3.0, -4.0])
    ref = np.array([-1.5, -2.0, -3.5, -5.0])
    mean, se = k1_mean_se(pol, ref)
    diffs = np.array([0.5, 0.0, 0.5, 1.0])
    assert mean == pytest.approx(0.5)
    assert se == pytest.approx(diffs.std(ddof=1) / 2.0)
    # k1 can be negative by noise (here: samples where the reference happens to be likelier)
    assert k1_mean_se([-2.0, -2.0], [-1.0, -1.5])[0] < 0
    assert math.isnan(k1_mean_se([-1.0], [-2.0])[1])
    with pytest.raises(ValueError, match="same shape"):
        k1_mean_se([0.0, 1.0], [0.0])


def test_kl_estimators_are_exact_on_a_categorical_in_expectation() -> None:
    # Samples in exact proportion to π = (1/2, 1/4, 1/4): both estimators equal KL(π || ref).
    pi = np.array([0.5, 0.25, 0.25])
    ref = np.array([0.2, 0.3, 0.5])
    kl = float((pi * np.log(pi / ref)).sum())
    tokens = np.array([0, 0, 1, 2])
    assert k1_mean_se(np.log(pi[tokens]), np.log(ref[tokens]))[0] == pytest.approx(kl, abs=1e-14)
    got = k3_token_mean(np.log(pi[tokens])[None, :], np.log(ref[tokens])[None, :])
    assert got == pytest.approx(kl, abs=1e-14)


def test_kl_k3_nonnegative_zero_when_equal_and_masked() -> None:
    rng = np.random.default_rng(15)
    pol = rng.normal(size=(4, 9))
    ref = rng.normal(size=(4, 9))
    assert k3_token_mean(pol, ref) >= 0.0
    assert k3_token_mean(pol, pol) == 0.0
    mask = np.zeros((4, 9), dtype=bool)
    mask[:, :3] = True
    pol_padded, ref_padded = pol.copy(), ref.copy()
    pol_padded[~mask] = np.nan  # padding may hold anything
    ref_padded[~mask] = -np.inf
    d = ref[:, :3] - pol[:, :3]
    expected = float((np.exp(d) - 1 - d).mean())
    assert k3_token_mean(pol_padded, ref_padded, mask) == pytest.approx(expected, rel=1e-13)
    assert k3_token_mean([[0.0, -1.0]], [[-0.5, -1.0]], [[1, 1]]) == pytest.approx(
        (math.exp(-0.5) - 1 + 0.5) / 2
    )
    with pytest.raises(ValueError, match="mask selects no tokens"):
        k3_token_mean(pol, ref, np.zeros((4, 9)))
    with pytest.raises(ValueError, match="mask must have the shape"):
        k3_token_mean(pol, ref, mask[:, :2])
    with pytest.raises(ValueError, match="must be finite at valid tokens"):
        k3_token_mean(pol_padded, ref_padded)


# --------------------------------------------------------------------------------------------
# Pareto frontier
# --------------------------------------------------------------------------------------------


def test_pareto_frontier_hand_case() -> None:
    kl = [0.0, 1.0, 1.0, 2.0, 0.5, 3.0, 3.0]
    reward = [0.0, 1.0, 2.0, 2.0, -1.0, 5.0, 5.0]
    # (1,1) < (1,2) same KL; (2,2) vs (1,2) same reward, more KL; (0.5,-1) vs (0,0);
    # the duplicated (3,5) points do not dominate each other.
    expected = [True, False, True, False, False, True, True]
    assert pareto_frontier(kl, reward).tolist() == expected


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pareto_frontier_matches_pairwise_definition(seed: int) -> None:
    rng = np.random.default_rng(50 + seed)
    kl = rng.integers(0, 6, size=40).astype(float)
    reward = rng.integers(0, 6, size=40).astype(float)
    dominated = [
        any(
            kl[j] <= kl[i] and reward[j] >= reward[i] and (kl[j] < kl[i] or reward[j] > reward[i])
            for j in range(40)
        )
        for i in range(40)
    ]
    assert pareto_frontier(kl, reward).tolist() == [not d for d in dominated]


def test_pareto_frontier_validation() -> None:
    with pytest.raises(ValueError, match="same shape"):
        pareto_frontier([0.0, 1.0], [0.0])
    with pytest.raises(ValueError, match="kl must contain only finite"):
        pareto_frontier([np.nan], [0.0])
