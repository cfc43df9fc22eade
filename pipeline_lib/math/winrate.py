"""Win rates (ties count 1/2) of policy samples against reference samples and against the
reference's best-of-n, of the reference's best-of-n against held-out reference samples, and the
(KL, reward) Pareto frontier. Pure numpy."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from pipeline_lib.math.bon import (
    FloatArray,
    as_float_array,
    as_ns,
    bon_curve,
    tie_blocks,
)


def _check_same_rows(a_name: str, a: FloatArray, b_name: str, b: FloatArray) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{a_name} and {b_name} must have the same number of prompts (rows), "
            f"got {a.shape} and {b.shape}"
        )


def win_rate_per_prompt(policy_scores: ArrayLike, reference_scores: ArrayLike) -> FloatArray:
    """Per-prompt win rate ``P(policy > reference) + ½ P(tie)`` over all ``K × M`` pairs.

    For prompt ``p``: ``(1/(K M)) Σ_k Σ_j [1(x_pk > r_pj) + ½ 1(x_pk = r_pj)]`` (the Mann–Whitney
    ``U/(K M)``), computed by sorting, not by a ``(P, K, M)`` broadcast.

    Args:
        policy_scores: ``(P, K)`` gold scores of policy samples.
        reference_scores: ``(P, M)`` gold scores of cached reference samples.

    Returns:
        float64 array of shape ``(P,)``.
    """
    pol = as_float_array("policy_scores", policy_scores, 2)
    ref = as_float_array("reference_scores", reference_scores, 2)
    _check_same_rows("policy_scores", pol, "reference_scores", ref)
    return beat_fraction(pol, ref).mean(axis=1)


def win_rate(policy_scores: ArrayLike, reference_scores: ArrayLike) -> float:
    """Mean over prompts of :func:`win_rate_per_prompt`: ``P(policy > ref) + ½ P(tie)``."""
    return float(win_rate_per_prompt(policy_scores, reference_scores).mean())


def _bon_inputs(policy_scores, reference_proxy, reference_gold):
    pol = as_float_array("policy_scores", policy_scores, 2)
    proxy = as_float_array("reference_proxy", reference_proxy, 2)
    gold = as_float_array("reference_gold", reference_gold, 2)
    if proxy.shape != gold.shape:
        raise ValueError(
            "reference_proxy and reference_gold must have the same shape, "
            f"got {proxy.shape} and {gold.shape}"
        )
    _check_same_rows("policy_scores", pol, "reference_proxy", proxy)
    return pol, proxy, gold


def beat_fraction(values: FloatArray, others: FloatArray) -> FloatArray:
    """``frac(others < v) + ½ frac(others = v)`` for every ``v`` of ``values``, row by row:
    ``(P, L)`` from ``values (P, L)`` and ``others (P, K)``, by one sort of each row of
    ``others`` and two binary searches per value."""
    _check_same_rows("values", values, "others", others)
    out = np.empty(values.shape, dtype=np.float64)
    sorted_others = np.sort(others, axis=1)
    k = others.shape[1]
    for row, (v, o) in enumerate(zip(values, sorted_others, strict=True)):
        below = np.searchsorted(o, v, side="left")
        out[row] = (below + 0.5 * (np.searchsorted(o, v, side="right") - below)) / k
    return out


def win_rates_vs_bon(
    policy_scores: ArrayLike, reference_proxy: ArrayLike, reference_gold: ArrayLike,
    ns: int | ArrayLike,
) -> FloatArray:
    """:func:`win_rate_vs_bon` at every n of ``ns`` at once.

    The win rate is linear in the BoN selection mass: ``Σ_j m_j(n) d_j`` with
    ``d_j = frac(policy > gold_j) + ½ frac(policy = gold_j)``, which does not depend on n. So it
    is the BoN curve (:func:`~pipeline_lib.math.bon.bon_curve`, proxy ties and all) of the score
    ``d``: one sort of each policy row, then the same weights and matrix product as the reward
    curves, for every n together.

    Returns:
        float64 array of shape ``(len(ns),)``.
    """
    return _win_rates_vs_bon(policy_scores, reference_proxy, reference_gold, ns, "ns")


def _win_rates_vs_bon(policy_scores, reference_proxy, reference_gold, ns, name: str
                      ) -> FloatArray:
    pol, proxy, gold = _bon_inputs(policy_scores, reference_proxy, reference_gold)
    n_arr = as_ns(ns, proxy.shape[1], name=name)
    if n_arr.size == 0:
        return np.zeros(0)
    return bon_curve(proxy, 1.0 - beat_fraction(gold, pol), n_arr)[1]


def win_rate_vs_bon(
    policy_scores: ArrayLike, reference_proxy: ArrayLike, reference_gold: ArrayLike, n: int
) -> float:
    """Win rate of policy samples against the reference's proxy-best-of-``n``, exact from the pool.

    The proxy-best of a uniformly random ``n``-subset (without replacement) of the ``M`` pooled
    responses is response ``j`` with probability ``m_j``: with the pool sorted by proxy ascending,
    rank ``i`` gets ``w_i(n) = C(i-1, n-1)/C(M, n)`` (as in :func:`bon_curve`), and within a block
    of tied proxy values the block's total weight is shared equally by its members (uniform
    tie-breaking).  Then, averaged over prompts and the ``K`` policy samples ``x``::

        win = Σ_j m_j [1(x > gold_j) + ½ 1(x = gold_j)]

    Args:
        policy_scores: ``(P, K)`` gold scores of policy samples.
        reference_proxy: ``(P, M)`` proxy scores of the pool (BoN selection criterion).
        reference_gold: ``(P, M)`` gold scores of the same pooled responses.
        n: BoN size, ``1 <= n <= M``.
    """
    if np.ndim(n) != 0 and np.size(n) != 1:
        raise ValueError(f"n must be a single integer, got {n!r}")
    return float(_win_rates_vs_bon(policy_scores, reference_proxy, reference_gold, n, "n")[0])


def bon_win_rates(
    pool_proxy: ArrayLike, pool_gold: ArrayLike, judges: ArrayLike, ns: int | ArrayLike
) -> FloatArray:
    """Gold win rate of the pool's proxy-best-of-n against held-out reference samples, at every
    n of ``ns`` (see :func:`bon_win_rate`), all n at once: the BoN curve of each pool sample's
    :func:`beat_fraction` against the judges (see :func:`bon_win_rates_of_beats`)."""
    return _bon_win_rates(pool_proxy, pool_gold, judges, ns, "ns")


def _bon_win_rates(pool_proxy, pool_gold, judges, ns, name: str) -> FloatArray:
    judge, proxy, gold = _bon_inputs(judges, pool_proxy, pool_gold)
    n_arr = as_ns(ns, proxy.shape[1], name=name)
    if n_arr.size == 0:
        return np.zeros(0)
    return bon_win_rates_of_beats(proxy, beat_fraction(gold, judge), n_arr)


def bon_win_rates_of_beats(pool_proxy: ArrayLike, beats: ArrayLike,
                           ns: int | ArrayLike) -> FloatArray:
    """:func:`bon_win_rates` from ``beats = beat_fraction(pool_gold, judges)``. The win rate is
    linear in the BoN selection mass, ``Σ_j m_j(n) beats_j``, and ``beats`` does not depend on
    the selection score, so one ``beats`` serves every objective of the same pool."""
    return bon_curve(pool_proxy, beats, ns)[1]


def bon_win_rate(
    pool_proxy: ArrayLike, pool_gold: ArrayLike, judges: ArrayLike, n: int
) -> float:
    """Gold win rate of the pool's proxy-best-of-``n`` against held-out reference samples.

    ``P(gold of BoN > judge) + ½ P(tie)``, exact from the pool (no resampling), averaged over the
    judges and the prompts.  The judges must be reference samples *not in the pool* (e.g. a
    fixed held-out subset of the cache): judged against the pool it selects from, the best of
    ``n`` also meets itself (a tie) and its own losers, which biases the rate (0.895 instead of
    8/9 at n = 8, M = 64).  With the BoN selection mass ``m_j`` of :func:`win_rate_vs_bon`::

        win = 1 - win(judges vs BoN) = Σ_j m_j [1(gold_j > r) + ½ 1(gold_j = r)],  mean over r

    For independent judges and continuous rewards (proxy = gold) its expectation is exactly
    ``n/(n+1)``: the best of ``n`` i.i.d. draws beats one more i.i.d. draw ``n/(n+1)`` of the
    time (the judge is the largest of the ``n + 1`` with probability ``1/(n+1)``).

    Args:
        pool_proxy: ``(P, L)`` proxy scores of the BoN pool (selection criterion).
        pool_gold: ``(P, L)`` gold scores of the same pooled responses.
        judges: ``(P, J)`` gold scores of held-out reference samples.
        n: BoN size, ``1 <= n <= L``.
    """
    if np.ndim(n) != 0 and np.size(n) != 1:
        raise ValueError(f"n must be a single integer, got {n!r}")
    return float(_bon_win_rates(pool_proxy, pool_gold, judges, n, "n")[0])


def pareto_frontier(kl: ArrayLike, reward: ArrayLike) -> NDArray[np.bool_]:
    """Mask of points on the (KL, reward) Pareto frontier (lower KL, higher reward is better).

    Point ``i`` is dominated iff some ``j`` has ``kl_j <= kl_i`` and ``reward_j >= reward_i`` with
    at least one strict; duplicated points do not dominate each other.  ``O(N log N)``: sort by KL,
    then ``i`` is dominated iff ``reward_i <= max(reward over strictly smaller KL)`` or
    ``reward_i < max(reward over equal KL)``.
    """
    k = as_float_array("kl", kl, 1)
    r = as_float_array("reward", reward, 1)
    if k.shape != r.shape:
        raise ValueError(f"kl and reward must have the same shape, got {k.shape} and {r.shape}")
    order = np.lexsort((-r, k))  # by kl ascending, then reward descending
    ks, rs = k[order], r[order]
    starts, counts = tie_blocks(ks[None, :])
    group_max = rs[starts]  # reward-descending within a KL group: first is the max
    prev_best = np.concatenate([[-np.inf], np.maximum.accumulate(group_max)[:-1]])
    dominated = (rs <= np.repeat(prev_best, counts)) | (rs < np.repeat(group_max, counts))
    mask = np.empty(k.size, dtype=bool)
    mask[order] = ~dominated
    return mask
