"""BoN estimators: unbiased weights over a cached pool, BoN curves, analytic and tie-aware KL.

Everything here is pure, I/O-free numpy (see ``docs/METHODS.md``).  Conventions:

* A *pool* is a ``(P, M)`` array: ``P`` prompts, ``M`` cached reference samples per prompt.
  ``gold[p, j]`` and ``proxy[p, j]`` score the same response.
* Ranks are 1-based and ascending: ``s_(1) <= ... <= s_(M)``.
* Best-of-n draws ``n`` of the ``M`` pooled samples *without replacement* and keeps the one with
  the highest proxy score; ties in the proxy are broken uniformly at random.

The central identity (order statistics of a uniformly random ``n``-subset)::

    P(the proxy-best of an n-subset has rank i) = w_i(n) = C(i-1, n-1) / C(M, n),   n <= i <= M,

so ``E[s(best of n)] = sum_{i=n}^{M} w_i(n) * s_(i)`` is the exact (unbiased, resampling-free)
expectation over all ``C(M, n)`` subsets of the pool.
"""


from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.special import gammaln

FloatArray = NDArray[np.float64]


#: Default tail tolerance of :func:`bon_curve` (see there): far below float64 round-off.
DEFAULT_TAIL_TOL = 1e-16


# Size (in float64 elements) of one block of BoN weights built at a time by bon_curve.
_BLOCK_ELEMENTS = 1 << 22


def as_float_array(name: str, a: ArrayLike, ndim: int) -> FloatArray:
    """``a`` as a finite float64 array of ``ndim`` dimensions; raises ValueError naming ``name``."""
    arr = np.asarray(a)
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise ValueError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {arr.shape}")
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} must contain only finite values (found NaN or inf)")
    return arr


def as_ns(ns: int | Sequence[int] | ArrayLike, m: int, name: str = "ns") -> NDArray[np.int64]:
    """The BoN sizes ``ns`` as int64 in [1, m]; raises ValueError naming ``name``."""
    arr = np.asarray(ns)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be an int or a 1-D sequence of ints, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype == np.bool_:
        raise ValueError(f"{name} must contain integers, got booleans")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or not (arr == np.round(arr)).all():
            raise ValueError(f"{name} must contain integers, got {arr.tolist()[:8]}")
    elif not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must contain integers, got dtype {arr.dtype}")
    out = arr.astype(np.int64)
    if out.min() < 1 or out.max() > m:
        raise ValueError(
            f"{name} must satisfy 1 <= n <= M = {m}; got min {out.min()}, max {out.max()}"
        )
    return out


def as_pool_size(m: int) -> int:
    if isinstance(m, bool) or not isinstance(m, int | np.integer) or m < 1:
        raise ValueError(f"M must be a positive integer, got {m!r}")
    return int(m)


def tie_blocks(sorted_keys: FloatArray) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
    """Blocks of equal values in each row of a row-wise sorted ``(P, L)`` array.

    Returns ``(starts, counts)``: flat (``ravel``) start index and length of every block, in order.
    Each row's first element always starts a block, so blocks never straddle rows.
    """
    p, length = sorted_keys.shape
    is_start = np.empty((p, length), dtype=bool)
    is_start[:, 0] = True
    np.not_equal(sorted_keys[:, 1:], sorted_keys[:, :-1], out=is_start[:, 1:])
    starts = np.flatnonzero(is_start)
    counts = np.diff(np.append(starts, p * length))
    return starts, counts


def block_mean(sorted_keys: FloatArray, values: FloatArray) -> FloatArray:
    """Replace each value by the mean of ``values`` over its tie block of ``sorted_keys``.

    ``sorted_keys`` is sorted along axis 1; ``values`` has the same shape and order.  Sums use
    ``np.add.reduceat`` (no cumulative-sum cancellation).  Returns a new array.
    """
    starts, counts = tie_blocks(sorted_keys)
    if starts.size == sorted_keys.size:  # no ties at all
        return np.array(values, dtype=np.float64, copy=True)
    sums = np.add.reduceat(np.ascontiguousarray(values, dtype=np.float64).ravel(), starts)
    return np.repeat(sums / counts, counts).reshape(sorted_keys.shape)


def _log_gamma_table(m: int) -> FloatArray:
    """``lg[k] = log Γ(k) = log (k-1)!`` for ``k = 0..m+1`` (``lg[0] = +inf``)."""
    with np.errstate(divide="ignore"):
        return gammaln(np.arange(m + 2, dtype=np.float64))


def _weight_block(lg: FloatArray, m: int, ns: NDArray[np.int64], start: int) -> FloatArray:
    """Rows ``w_i(n)`` for ``n`` in ``ns`` and 0-based columns ``start..M-1`` (ranks ``start+1..M``).

    ``log w_i(n) = log n + lg[i] - lg[i-n+1] + lg[M-n+1] - lg[M+1]`` with ``lg[k] = log Γ(k)``
    (this is ``log C(i-1, n-1) - log C(M, n)`` with the ``(n-1)!`` factors cancelled); zero for
    ``i < n``.  Each row is renormalised to sum to one: that cancels the round-off of the per-row
    constant and, with truncation (``start > n - 1``), redistributes the dropped tail mass
    (at most ``tail_tol``, see :func:`bon_curve`).
    """
    ranks = np.arange(start + 1, m + 1, dtype=np.int64)
    idx = ranks[None, :] - ns[:, None] + 1  # i - n + 1; valid (nonzero weight) iff >= 1
    invalid = idx < 1
    np.maximum(idx, 1, out=idx)
    logw = lg[idx]
    np.subtract(lg[ranks][None, :], logw, out=logw)
    logw += (np.log(ns) + lg[m - ns + 1] - lg[m + 1])[:, None]
    np.exp(logw, out=logw)
    logw[invalid] = 0.0
    logw /= logw.sum(axis=1, keepdims=True)
    return logw


def _first_columns(lg: FloatArray, m: int, ns: NDArray[np.int64], tail_tol: float) -> NDArray:
    """0-based first column needed for each ``n``: the largest ``k`` in ``[n-1, M-1]`` with
    ``P(max rank <= k) = C(k, n) / C(M, n) <= tail_tol``.

    Ranks ``<= k`` then carry total BoN weight ``<= tail_tol`` and are skipped.  ``k = n - 1`` always
    qualifies (mass 0; ``tail_tol = 0`` keeps exactly the ranks with nonzero weight).  Vectorised
    bisection over all ``n`` at once; the log tail is
    ``lg[k+1] - lg[k-n+1] - lg[M+1] + lg[M-n+1]``.
    """
    lo = ns - 1
    if tail_tol <= 0.0:
        return lo
    log_tol = np.log(tail_tol)
    hi = np.full_like(ns, m)  # P(max rank <= M) = 1 > tail_tol
    if tail_tol >= 1.0:
        return hi - 1
    while True:
        active = hi - lo > 1
        if not active.any():
            return lo
        mid = (lo + hi) // 2
        k = np.where(active, mid, ns)  # inactive entries: any valid k >= n, result unused
        log_tail = lg[k + 1] - lg[k - ns + 1] - lg[m + 1] + lg[m - ns + 1]
        ok = log_tail <= log_tol
        lo = np.where(active & ok, mid, lo)
        hi = np.where(active & ~ok, mid, hi)


def bon_weights(M: int, ns: int | Sequence[int] | ArrayLike) -> FloatArray:  # noqa: N803
    """BoN order-statistic weights, shape ``(len(ns), M)``.

    ``W[a, i-1] = w_i(n_a) = C(i-1, n_a-1) / C(M, n_a)`` for ``i >= n_a``, else 0: the probability
    that the best of a uniformly random ``n_a``-subset of ``M`` ranked items has (1-based,
    ascending) rank ``i``.  Each row sums to one (``Σ_{i=n}^{M} C(i-1, n-1) = C(M, n)``, the hockey
    stick identity).  Computed in log space via ``scipy.special.gammaln`` so ``M`` in the tens of
    thousands does not overflow.  Memory is ``8 · len(ns) · M`` bytes; :func:`bon_curve` builds the
    same weights block by block instead of calling this.
    """
    m = as_pool_size(M)
    n_arr = as_ns(ns, m)
    if n_arr.size == 0:
        return np.zeros((0, m), dtype=np.float64)
    return _weight_block(_log_gamma_table(m), m, n_arr, 0)


def bon_curve(
    proxy: ArrayLike,
    gold: ArrayLike,
    ns: int | Sequence[int] | ArrayLike,
    *,
    tail_tol: float = DEFAULT_TAIL_TOL,
) -> tuple[FloatArray, FloatArray]:
    """Expected proxy and gold reward of the proxy-best of ``n``, averaged over prompts.

    For every prompt, sort the ``M`` pooled samples by proxy ascending (``s_(1..M)``) and use the
    exact expectation over all ``C(M, n)`` subsets of size ``n`` (drawn without replacement)::

        E[s(proxy-best of n)] = Σ_{i=n}^{M} C(i-1, n-1) / C(M, n) · s_(i)

    applied to the proxy and to the gold score at the same ranks.  The result is the mean of
    these per-prompt expectations over the ``P`` prompts (no resampling, no Monte Carlo noise).

    **Ties in the proxy** are averaged over: the selected response is uniform over the subset
    members that attain the subset's maximal proxy value.  Exactly, for the gold score: within each
    block of tied proxy values, replace every gold value by the block's mean gold, then apply the
    weights.  (Given that the subset's maximum falls in block ``B``, the subset's members in ``B``
    are, by exchangeability, a uniformly random subset of ``B`` of some size, so the expected
    average of their gold is the block mean; the weights of ``B``'s ranks sum to the probability of
    that event.)  The proxy is unaffected by ties.

    Cost: one ``argsort`` per row (``O(M log M)``), then the weights for all ``n`` at once in log
    space and a matrix product ``(2P, M) @ (M, len(ns))``, done in column blocks.  Ranks whose total
    weight for a given ``n`` is ``<= tail_tol`` (the tail probability ``C(k, n)/C(M, n)`` is exact)
    are skipped, so the absolute error from truncation is at most ``tail_tol · max|s|``; with the
    default ``1e-16`` that is below float64 round-off of the sum itself.  ``tail_tol=0`` skips only
    the exact zeros (``i < n``).  Weight round-off comes from differences of ``log Γ`` values of
    size ``~M log M``; at ``M = 12600`` the curves agree with exact rational weights to ~``1e-12``
    (see ``benchmarks/bench_bon_curve.py``).

    Args:
        proxy: ``(P, M)`` proxy scores (selection criterion).
        gold: ``(P, M)`` gold scores of the same responses.
        ns: ``n`` values, each ``1 <= n <= M`` (any order, duplicates allowed).
        tail_tol: total weight allowed to be dropped per ``n`` (see above), in ``[0, 1)``.

    Returns:
        ``(proxy_curve, gold_curve)``, float64 arrays of length ``len(ns)``.
    """
    proxy_arr = as_float_array("proxy", proxy, 2)
    gold_arr = as_float_array("gold", gold, 2)
    if proxy_arr.shape != gold_arr.shape:
        raise ValueError(
            f"proxy and gold must have the same shape, got {proxy_arr.shape} and {gold_arr.shape}"
        )
    if not (0.0 <= tail_tol < 1.0):
        raise ValueError(f"tail_tol must be in [0, 1), got {tail_tol!r}")
    p, m = proxy_arr.shape
    n_arr = as_ns(ns, m)
    if n_arr.size == 0:
        return np.zeros(0), np.zeros(0)

    order = np.argsort(proxy_arr, axis=1)
    sorted_proxy = np.take_along_axis(proxy_arr, order, axis=1)
    sorted_gold = np.take_along_axis(gold_arr, order, axis=1)
    # Stack proxy and tie-averaged gold so that one matrix product serves both.
    scores = np.empty((2 * p, m), dtype=np.float64)
    scores[:p] = sorted_proxy
    scores[p:] = block_mean(sorted_proxy, sorted_gold)

    perm = np.argsort(n_arr, kind="stable")
    means = _weighted_sums(scores, n_arr[perm], tail_tol).reshape(2, p, -1).mean(axis=1)
    result = np.empty_like(means)
    result[:, perm] = means
    return result[0], result[1]


def _weighted_sums(scores: FloatArray, n_sorted: NDArray[np.int64], tail_tol: float) -> FloatArray:
    """``scores`` (rows ascending by proxy rank) times the BoN weights of each ``n`` (sorted
    ascending): ``(rows, len(n_sorted))``, computed in column blocks that skip negligible ranks."""
    m = scores.shape[1]
    lg = _log_gamma_table(m)
    first = _first_columns(lg, m, n_sorted, tail_tol)  # non-decreasing in n
    neg_width = first - m  # -(columns needed), non-decreasing
    out = np.empty((scores.shape[0], n_sorted.size), dtype=np.float64)
    a = 0
    while a < n_sorted.size:
        start = int(first[a])
        width = m - start
        # Grow the block while it fits the element budget and no n in it needs fewer than half
        # the columns of the first one (bounds the wasted work on structural zeros to 2x).
        b_half = int(np.searchsorted(neg_width, -((width + 1) // 2), side="right"))
        b = max(a + 1, min(b_half, a + max(1, _BLOCK_ELEMENTS // width), n_sorted.size))
        w = _weight_block(lg, m, n_sorted[a:b], start)
        out[:, a:b] = scores[:, start:] @ w.T
        a = b
    return out


def bon_kl(n: float | ArrayLike) -> float | FloatArray:
    """Analytic ``KL(π_BoN ‖ π_ref) = log n - (n - 1) / n`` (continuous rewards).

    An upper bound on the true KL when rewards can tie (Beirami et al., 2024); see
    :func:`bon_kl_ties` for the tie-aware value.  Returns a float for scalar input, else an array.
    """
    arr = np.asarray(n, dtype=np.float64)
    if not np.isfinite(arr).all() or (arr < 1).any():
        raise ValueError(f"n must be finite and >= 1, got {n!r}")
    out = np.log(arr) - (arr - 1.0) / arr
    return float(out) if out.ndim == 0 else out


def _log1mexp(x: FloatArray) -> FloatArray:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate on both sides of ``-log 2``."""
    out = np.empty_like(x)
    near = x > -np.log(2.0)
    with np.errstate(divide="ignore"):
        out[near] = np.log(-np.expm1(x[near]))
        out[~near] = np.log1p(-np.exp(x[~near]))
    return out


def _bon_kl_ties_per_prompt(rewards: FloatArray, ns: NDArray[np.int64]) -> FloatArray:
    """Tie-aware BoN KL for each row of ``(P, M)`` rewards and each n: shape ``(len(ns), P)``."""
    p, m = rewards.shape
    sorted_r = np.sort(rewards, axis=1)
    starts, counts = tie_blocks(sorted_r)
    rows = starts // m
    below = (starts - rows * m).astype(np.float64)  # #{< v} in the row
    log_q = np.log(counts / m)
    log_f = np.log((below + counts) / m)  # log F(v)
    with np.errstate(divide="ignore"):
        log_f_minus = np.log(below / m)  # log F⁻(v), -inf for the smallest value
    out = np.empty((ns.size, p), dtype=np.float64)
    for a, n in enumerate(ns):
        if n == 1:  # π_BoN = π_ref exactly
            out[a] = 0.0
            continue
        # log(F^n - F⁻^n) = n log F + log(1 - (F⁻/F)^n)
        log_pb = n * log_f + _log1mexp(n * (log_f_minus - log_f))
        pb = np.exp(log_pb)
        terms = np.where(pb > 0.0, pb * (log_pb - log_q), 0.0)
        out[a] = np.bincount(rows, weights=terms, minlength=p)
    return np.maximum(out, 0.0)  # KL >= 0; clip round-off (e.g. n = 1 gives ~1e-16)


def bon_kl_ties(rewards: ArrayLike, n: int) -> float:
    """Tie-aware ``KL(π_BoN ‖ π_ref)`` on the empirical distribution of one prompt's rewards.

    ``π_ref`` is the empirical distribution of the ``M`` cached samples (mass ``1/M`` each); BoN
    draws ``n`` i.i.d. samples from it and keeps the best, ties broken uniformly.  With
    ``F(r) = #{r_j <= r}/M`` and ``F⁻(r) = #{r_j < r}/M``, each distinct reward value ``v`` has
    reference mass ``q_v = F(v) - F⁻(v)`` and BoN mass ``p_v = F(v)^n - F⁻(v)^n`` (tied samples
    share it uniformly, so the KL over samples equals the KL over values)::

        KL = Σ_v p_v · log(p_v / q_v)

    Computed in log space.  Equals ``log n - (n-1)/n`` only in the continuous limit (all values
    distinct, ``M → ∞``); it is never larger, and is 0 when all rewards tie.
    """
    arr = as_float_array("rewards", rewards, 1)
    n_arr = as_ns(n, np.iinfo(np.int64).max, name="n")
    if n_arr.size != 1:
        raise ValueError(f"n must be a single integer, got {n!r}")
    return float(_bon_kl_ties_per_prompt(arr[None, :], n_arr)[0, 0])


def bon_kl_ties_batch(rewards_2d: ArrayLike, ns: int | Sequence[int] | ArrayLike) -> FloatArray:
    """:func:`bon_kl_ties` for every row of ``(P, M)`` rewards and every ``n``, mean over prompts.

    Vectorised over prompts (one row-wise sort and tie-block pass), loop over ``ns``.  ``n`` may
    exceed ``M`` (BoN here samples with replacement from the empirical distribution).

    Returns:
        float64 array of shape ``(len(ns),)``.
    """
    arr = as_float_array("rewards_2d", rewards_2d, 2)
    n_arr = as_ns(ns, np.iinfo(np.int64).max)
    if n_arr.size == 0:
        return np.zeros(0)
    return _bon_kl_ties_per_prompt(arr, n_arr).mean(axis=1)
