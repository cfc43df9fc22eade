"""Per-prompt reward CDFs from the M-sample reference cache (pure numpy, no I/O).

Notation (docs/METHODS.md): a prompt's M cached rewards r_1..r_M, sorted ascending.

* smoothed empirical CDF, the vBoN code's estimator:
  F̂(r) = (1 + #{j : r_j < r}) / (M + 1)  in [1/(M+1), 1], so log F̂ is always finite;
* F⁻(r) = #{j : r_j < r} / M, the mass strictly below r, and F(r) = #{j : r_j <= r} / M;
  their difference is the tie mass at r (used by the exact vBoN bound);
* optional ``curvefit`` smoothing: log F̂(r) ≈ −a·exp(−b·r) − c, fitted with scipy.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np


def _as_sorted_1d(sorted_rewards: np.ndarray) -> np.ndarray:
    s = np.asarray(sorted_rewards, dtype=np.float64)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"sorted_rewards must be a non-empty 1-D array, got shape {s.shape}")
    return s


def _count(sorted_rewards: np.ndarray, rewards: np.ndarray, side: str) -> np.ndarray:
    r = np.asarray(rewards, dtype=np.float64)
    s = np.asarray(sorted_rewards, dtype=np.float64)
    if s.ndim == 2:  # one row per query: each query against its own prompt's pool
        if s.shape[0] != r.size or s.shape[1] == 0:
            raise ValueError(f"sorted_rewards rows {s.shape} must match the {r.size} queries")
        r = r.reshape(-1, 1)
        return ((s < r) if side == "left" else (s <= r)).sum(axis=1)
    return np.searchsorted(_as_sorted_1d(s), r, side=side)


def count_below(sorted_rewards: np.ndarray, rewards: np.ndarray) -> np.ndarray:
    """#{j : r_j < r} for each query r: against one ascending pool (1-D), or, with a (B, M)
    matrix of ascending rows, each of the B queries against its own row."""
    return _count(sorted_rewards, rewards, "left")


def count_at_or_below(sorted_rewards: np.ndarray, rewards: np.ndarray) -> np.ndarray:
    """#{j : r_j <= r} for each query r (1-D pool or one row per query, as :func:`count_below`)."""
    return _count(sorted_rewards, rewards, "right")


def empirical_cdf(sorted_rewards: np.ndarray, rewards: np.ndarray) -> np.ndarray:
    """Smoothed empirical CDF F̂(r) = (1 + #{cached < r}) / (M + 1) per query reward.

    ``sorted_rewards``: one prompt's M cached rewards, ascending. ``rewards``: query rewards.
    """
    s = _as_sorted_1d(sorted_rewards)
    return (1.0 + count_below(s, rewards)) / (s.size + 1.0)


def cdf_below(sorted_rewards: np.ndarray, rewards: np.ndarray) -> np.ndarray:
    """F⁻(r) = #{cached < r} / M: the empirical mass strictly below r."""
    s = _as_sorted_1d(sorted_rewards)
    return count_below(s, rewards) / float(s.size)


def cdf_at_or_below(sorted_rewards: np.ndarray, rewards: np.ndarray) -> np.ndarray:
    """F(r) = #{cached <= r} / M: the empirical CDF including ties at r."""
    s = _as_sorted_1d(sorted_rewards)
    return count_at_or_below(s, rewards) / float(s.size)


def tie_mass(sorted_rewards: np.ndarray, rewards: np.ndarray) -> np.ndarray:
    """F(r) − F⁻(r): the empirical probability of exactly r."""
    s = _as_sorted_1d(sorted_rewards)
    return (count_at_or_below(s, rewards) - count_below(s, rewards)) / float(s.size)


def group_sorted_matrix(
    codes: np.ndarray, rewards: np.ndarray, n_groups: int, m: int
) -> np.ndarray:
    """Sort long-format rewards into a (n_groups, m) matrix, each row ascending.

    ``codes``: integer group index (0..n_groups-1) per reward. Every group must hold exactly
    ``m`` rewards (checked). One stable argsort by group, a reshape, one row-wise sort.
    """
    codes = np.asarray(codes)
    rewards = np.asarray(rewards, dtype=np.float64)
    if codes.shape != rewards.shape or codes.ndim != 1:
        raise ValueError("codes and rewards must be 1-D arrays of equal length")
    counts = np.bincount(codes, minlength=n_groups)
    if counts.size != n_groups or np.any(counts != m):
        bad = int(np.flatnonzero(counts != m)[0]) if counts.size == n_groups else n_groups
        raise ValueError(
            f"every prompt must have exactly M={m} rewards; group {bad} has "
            f"{int(counts[bad]) if bad < counts.size else 'an out-of-range code'}"
        )
    # the smallest unsigned dtype lets numpy's stable sort use radix sort (O(N)) for <= 16 bits
    small = codes.astype(np.min_scalar_type(max(n_groups - 1, 0)), copy=False)
    order = np.argsort(small, kind="stable")
    return np.sort(rewards[order].reshape(n_groups, m), axis=1)


def batched_empirical_cdf(
    sorted_matrix: np.ndarray, row: np.ndarray, rewards: np.ndarray
) -> np.ndarray:
    """F̂ for query rewards belonging to different prompts.

    ``sorted_matrix``: (P, M) rows ascending; ``row``: prompt row per query; ``rewards``: query
    rewards. Queries are grouped by row and each group answered by one searchsorted.
    """
    sorted_matrix = np.asarray(sorted_matrix, dtype=np.float64)
    row = np.asarray(row)
    rewards = np.asarray(rewards, dtype=np.float64)
    below = np.empty(rewards.shape, dtype=np.int64)
    order = np.argsort(row, kind="stable")
    bounds = np.searchsorted(row[order], np.arange(sorted_matrix.shape[0] + 1))
    for p in range(sorted_matrix.shape[0]):
        idx = order[bounds[p] : bounds[p + 1]]
        if idx.size:
            below[idx] = np.searchsorted(sorted_matrix[p], rewards[idx], side="left")
    return (1.0 + below) / (sorted_matrix.shape[1] + 1.0)


def self_cdf_matrix(sorted_matrix: np.ndarray) -> np.ndarray:
    """F̂ evaluated at every cached reward of every prompt, fully vectorised.

    For row-sorted rewards, #{j : r_j < r_i} is the index of the first occurrence of r_i in
    its row; computed for all rows at once without a Python loop.
    """
    s = np.asarray(sorted_matrix, dtype=np.float64)
    p, m = s.shape
    idx = np.broadcast_to(np.arange(m), (p, m))
    new_block = np.ones((p, m), dtype=bool)
    new_block[:, 1:] = s[:, 1:] != s[:, :-1]
    first = np.maximum.accumulate(np.where(new_block, idx, 0), axis=1)
    return (1.0 + first) / (m + 1.0)


@dataclass(frozen=True)
class CurveFit:
    """Fitted log F̂(r) ≈ −a·exp(−b·r) − c; ``ok`` is False where the fit failed."""

    a: float
    b: float
    c: float
    rmse: float
    ok: bool

    def log_cdf(self, rewards: np.ndarray) -> np.ndarray:
        r = np.asarray(rewards, dtype=np.float64)
        return np.minimum(-self.a * np.exp(-self.b * r) - self.c, 0.0)


def _log_cdf_model(r: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    return -a * np.exp(-b * r) - c


def fit_log_cdf(sorted_rewards: np.ndarray) -> CurveFit:
    """Fit log F̂(r) ≈ −a·exp(−b·r) − c to one prompt's cached rewards.

    Points are (r_(i), log F̂(r_(i))). Returns ``ok=False`` (NaN parameters) where scipy fails
    to converge or the result is not finite; callers then fall back to the empirical CDF.
    """
    from scipy.optimize import OptimizeWarning, curve_fit  # scipy: only when fitting

    s = _as_sorted_1d(sorted_rewards)
    y = np.log(empirical_cdf(s, s))
    if np.ptp(s) == 0.0:
        return CurveFit(np.nan, np.nan, np.nan, np.nan, False)
    # Centre and scale r so that the exponential is well conditioned; map back afterwards.
    mu, sd = float(s.mean()), float(s.std()) or 1.0
    z = (s - mu) / sd
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)
            warnings.simplefilter("ignore", RuntimeWarning)
            (a, b, c), _ = curve_fit(
                _log_cdf_model,
                z,
                y,
                p0=(1.0, 1.0, 0.0),
                bounds=([0.0, 0.0, -np.inf], [np.inf, np.inf, np.inf]),
                maxfev=2000,
            )
    except (RuntimeError, ValueError):
        return CurveFit(np.nan, np.nan, np.nan, np.nan, False)
    # -a exp(-b (r - mu)/sd) = -(a exp(b mu / sd)) exp(-(b/sd) r)
    a_r, b_r = a * np.exp(b * mu / sd), b / sd
    rmse = float(np.sqrt(np.mean((_log_cdf_model(z, a, b, c) - y) ** 2)))
    ok = bool(np.all(np.isfinite([a_r, b_r, c, rmse])))
    if not ok:
        return CurveFit(np.nan, np.nan, np.nan, np.nan, False)
    return CurveFit(float(a_r), float(b_r), float(c), rmse, True)
