"""vBoN: log pi_BoN/pi_ref (exact, tie-aware) and its l1 bound log F, beta = 1/(n-1), and the
sequence rewards of fresh samples against a prompt's cached rewards. Pure numpy."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from pipeline_lib.math.cdf import CurveFit, count_at_or_below, count_below

ArrayLike = npt.ArrayLike


_SCALES = ("n_minus_1", "n")


_PROB_TOL = 1e-9  # round-off allowed on probabilities built from sums (e.g. a CDF reaching 1)


def _as_prob_array(name: str, x: ArrayLike) -> np.ndarray:
    """float64 copy of ``x`` checked to lie in [0, 1] (up to ``_PROB_TOL``), then clipped."""
    arr = np.asarray(x, dtype=np.float64)
    if np.any(~np.isfinite(arr)) or np.any(arr < -_PROB_TOL) or np.any(arr > 1.0 + _PROB_TOL):
        raise ValueError(f"{name} must contain probabilities in [0, 1]")
    return np.clip(arr, 0.0, 1.0)


def check_n(n: float, minimum: float = 1.0) -> float:
    if isinstance(n, bool) or not isinstance(n, (int, float, np.integer, np.floating)):
        raise ValueError(f"n must be a number >= {minimum}, got {n!r}")
    n = float(n)
    if not math.isfinite(n) or n < minimum:
        raise ValueError(f"n must be a finite number >= {minimum}, got {n!r}")
    return n


def vbon_reward_l1(cdf_values: ArrayLike) -> np.ndarray:
    """vBoN ``l1``-bound sequence reward R(y) = log F̂(r(y)).

    ``cdf_values`` are smoothed CDF values F̂ in (0, 1] (e.g. (1 + #{r_j < r}) / (M + 1)), so the
    reward is finite, <= 0 and monotone increasing in F̂ (hence in the reward r).

    Returns:
        float64 array of the same shape as ``cdf_values``.

    Raises:
        ValueError: if any ``cdf_values`` lies outside (0, 1].
    """
    f = np.asarray(cdf_values, dtype=np.float64)
    if np.any(~np.isfinite(f)) or np.any(f <= 0.0) or np.any(f > 1.0 + _PROB_TOL):
        raise ValueError("cdf_values must lie in (0, 1]")
    return np.log(np.minimum(f, 1.0))


def _log_geometric_ratio(u: np.ndarray, n: float) -> np.ndarray:
    """log((1 - q^n) / (1 - q)) for q = exp(u), u <= 0, with the q -> 1 limit log n.

    Uses expm1 so it is accurate for q close to 1; u = -inf (q = 0) gives 0.
    """
    at_one = u == 0.0
    u_safe = np.where(at_one, -1.0, u)
    with np.errstate(divide="ignore"):
        val = np.log(-np.expm1(n * u_safe)) - np.log(-np.expm1(u_safe))
    return np.where(at_one, math.log(n), val)


def log_bon_ratio(
    f_below: ArrayLike,
    f_at: ArrayLike | None,
    n: float,
    p: ArrayLike | None = None,
) -> np.ndarray:
    """Tie-aware log(pi_BoN(y) / pi_ref(y)), elementwise, in log space.

    **Distribution form** (``p is None``). With F = P(R <= r(y)) (``f_at``) and
    F⁻ = P(R < r(y)) (``f_below``), ties broken uniformly:

        log( [F^n - F⁻^n] / [F - F⁻] ),

    and, when F - F⁻ -> 0 (no ties, continuous rewards), the limit log(n F^(n-1)).

    **vBoN-code form** (``p`` given): p = pi_ref(y) is the response's own probability (e.g.
    ``exp(ref_logprob)``); ``f_at`` is ignored (may be None) and

        log( ((F⁻ + p)^n - F⁻^n) / p ),

    with the p -> 0 limit log(n F⁻^(n-1)). It coincides with the distribution form when
    p = F - F⁻ (one response carries the whole tie mass).

    Both forms use the exact identity (a^n - b^n) / (a - b) = a^(n-1) * (1 - q^n) / (1 - q) with
    a the upper CDF value and q = b / a in [0, 1]:

        log ratio = (n - 1) log a + log(-expm1(n u)) - log(-expm1(u)),   u = log q <= 0,

    which is stable for q -> 1 (tiny tie mass or tiny p, limit log n), for F⁻ = 0 (u = -inf, term
    0), and never forms a^n - b^n directly. In the p-form u = -log1p(p / F⁻), so a tiny p is not
    lost against F⁻. Entries with a = 0 (only possible when F⁻ = p = 0) give -inf for n > 1.

    Args:
        f_below: F⁻, mass strictly below the response's reward, in [0, 1].
        f_at: F, mass at or below the response's reward, in [F⁻, 1]; ignored when ``p`` is given.
        n: BoN size (>= 1; need not be an integer).
        p: optional pi_ref(y) in [0, 1] for the vBoN-code form.

    Returns:
        float64 array broadcast from the inputs.
    """
    n = check_n(n)
    fb = _as_prob_array("f_below", f_below)
    if p is None:
        if f_at is None:
            raise ValueError("f_at is required when p is not given")
        fa = _as_prob_array("f_at", f_at)
        fb, fa = np.broadcast_arrays(fb, fa)
        if np.any(fa < fb - _PROB_TOL):
            raise ValueError("f_at must be >= f_below elementwise")
        if np.any(fa <= 0.0):
            raise ValueError("f_at must be > 0 (a response's own reward has positive mass)")
        fb = np.minimum(fb, fa)
        log_a = np.log(fa)
        with np.errstate(divide="ignore"):
            u = np.log(fb) - log_a  # log q, -inf where F⁻ = 0
        u = np.minimum(u, 0.0)
    else:
        pp = _as_prob_array("p", p)
        fb, pp = np.broadcast_arrays(fb, pp)
        if np.any(fb + pp > 1.0 + _PROB_TOL):
            raise ValueError("f_below + p must be <= 1")
        with np.errstate(divide="ignore", invalid="ignore"):
            log_fb = np.log(fb)
            log_p = np.log(pp)
            log_a = np.logaddexp(log_fb, log_p)
            # u = log(F⁻ / (F⁻ + p)) = -log1p(p / F⁻); -inf where F⁻ = 0.
            u = np.where(fb > 0.0, -np.log1p(pp / np.where(fb > 0.0, fb, 1.0)), -np.inf)
    # (n - 1) * log a with the convention 0 * (-inf) = 0 for n = 1.
    with np.errstate(invalid="ignore"):
        lead = np.where(n == 1.0, 0.0, (n - 1.0) * log_a)
    return np.asarray(lead + _log_geometric_ratio(u, n), dtype=np.float64)


def vbon_reward_exact(
    f_below: ArrayLike,
    f_at: ArrayLike | None,
    n: float,
    p: ArrayLike | None = None,
    scale: str = "n_minus_1",
) -> np.ndarray:
    """vBoN ``exact``-bound sequence reward, a scaled tie-aware log BoN ratio.

        scale="n_minus_1" (clean form):  R = (1 / (n - 1)) * log(pi_BoN(y) / pi_ref(y))
        scale="n"         (vBoN code):   R = (1 / n)       * log(pi_BoN(y) / pi_ref(y))

    Both are used with KL coefficient beta = 1/(n - 1). With the clean form the maximiser of
    E_pi[R] - beta KL(pi || pi_ref) is exactly pi_BoN; the code's 1/n convention is a slightly
    weaker reward. The two are not interchangeable, so **the run's log must say which
    convention is used**. See :func:`log_bon_ratio` for the arguments.

    Returns:
        float64 array.
    """
    if scale not in _SCALES:
        raise ValueError(f"scale must be one of {_SCALES}, got {scale!r}")
    n = check_n(n, minimum=1.0)
    if scale == "n_minus_1" and n <= 1.0:
        raise ValueError(f"n must be > 1 for scale='n_minus_1', got {n!r}")
    denom = n - 1.0 if scale == "n_minus_1" else n
    return log_bon_ratio(f_below, f_at, n, p=p) / denom


def vbon_beta(n: float) -> float:
    """KL coefficient of the vBoN objective, beta = 1 / (n - 1) (n > 1)."""
    n = check_n(n)
    if n <= 1.0:
        raise ValueError(f"n must be > 1, got {n!r}")
    return 1.0 / (n - 1.0)


def vbon_n_from_beta(beta: float) -> float:
    """The BoN size matched by a vBoN KL coefficient, n = 1/beta + 1 (beta > 0)."""
    if not (beta > 0) or not math.isfinite(beta):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    return 1.0 / beta + 1.0


def vbon_rewards(
    sorted_rows: np.ndarray,
    rewards: np.ndarray,
    n: int,
    bound: str,
    exact_scale: str = "n_minus_1",
    fits: list[CurveFit | None] | None = None,
) -> np.ndarray:
    """The vBoN sequence reward of fresh policy samples with proxy rewards ``rewards``.

    * ``l1``: log F̂(r), F̂(r) = (1 + #{cached < r}) / (M + 1) — or the prompt's fitted
      log-CDF where ``fits`` has a successful curve fit (vBoN ``--curvefit``), clipped to
      [log 1/(M+1), 0] like F̂.
    * ``exact``: (1/(n−1))·log(π_BoN/π_ref) with the tie-aware form
      [Fⁿ − F⁻ⁿ]/[F − F⁻], where the fresh sample is counted as one of M + 1 draws
      (F⁻ = #{cached < r}/(M+1), F = (#{cached <= r} + 1)/(M+1)) — the same smoothing as F̂,
      so the reward is finite for a response below every cached one. ``exact_scale="n"``
      uses the vBoN code's 1/n scale instead of 1/(n−1).
    """
    s = np.asarray(sorted_rows, dtype=np.float64)
    m = s.shape[1]
    below, at_or_below = count_below(s, rewards), count_at_or_below(s, rewards)
    if bound == "l1":
        reward = vbon_reward_l1((1.0 + below) / (m + 1.0))
        if fits is not None:
            floor = -np.log(m + 1.0)  # the smoothed empirical CDF's floor, log 1/(M+1)
            for i, fit in enumerate(fits):
                if fit is not None and fit.ok:
                    fitted = float(fit.log_cdf(np.asarray([rewards[i]]))[0])
                    reward[i] = min(max(fitted, floor), 0.0)
        return reward
    if bound == "exact":
        return vbon_reward_exact(below / (m + 1.0), (at_or_below + 1.0) / (m + 1.0), n,
                                 scale=exact_scale)
    raise ValueError(f"bound must be 'exact' or 'l1', got {bound!r}")
