"""KL–reward frontiers with uncertainty: interpolation onto a shared KL grid, a paired hierarchical
bootstrap over prompts and training seeds, and Pareto flags that respect standard errors.

Pure numpy; no I/O.  Conventions:

* A *sweep* is one method trained at several values of its knob (β, λ, ...): one *run* per knob
  value, each trained with ``S`` seeds and evaluated on the same ``P`` test prompts.
* The shared *grid* is the KLs of the BoN points (one per ``n``); a method's frontier is read off
  at those KLs by piecewise-linear interpolation along its sweep, never extrapolated.
* Every KL carries the name of its estimator (:data:`KL_ESTIMATORS`): policies use the sampled
  estimators ``k1``/``k3`` of ``KL(π ‖ π_ref)`` (unbiased, noisy); BoN uses the analytic
  ``log n - (n-1)/n`` (exact for continuous rewards, an upper bound under ties) or the tie-aware
  value.  They estimate the same quantity but with different error, so a frontier that mixes them
  must carry the KL's standard error (zero for the analytic value) — see
  :func:`pareto_flags_se`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from pipeline_lib.math.bon import FloatArray, as_float_array

#: Per-sample ``log π - log π_ref`` averaged over samples (see ``pipeline_lib/math/kl.py``).
KL_K1 = "k1"
#: Per-sample ``exp(r) - 1 - r`` with ``r = log π_ref - log π``, averaged over samples.
KL_K3 = "k3"
#: Analytic BoN KL ``log n - (n-1)/n`` (continuous rewards; an upper bound under ties).
KL_ANALYTIC_BON = "analytic_bon"
#: Tie-aware BoN KL on the empirical reward distribution of each prompt.
KL_BON_TIES = "bon_ties"
#: Every KL estimator name a frontier point may carry.
KL_ESTIMATORS = (KL_K1, KL_K3, KL_ANALYTIC_BON, KL_BON_TIES)

# Elements (float64) of one block of bootstrap replicates built at a time.
_BLOCK_ELEMENTS = 1 << 22


def check_kl_estimator(name: str) -> str:
    """``name`` if it is one of :data:`KL_ESTIMATORS`, else ValueError listing them."""
    if name not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {name!r}; expected one of {KL_ESTIMATORS}")
    return name


# --------------------------------------------------------------------------------------------
# Interpolation
# --------------------------------------------------------------------------------------------


def interpolate_frontier(
    kl: ArrayLike, value: ArrayLike, grid: ArrayLike
) -> tuple[FloatArray, NDArray[np.bool_]]:
    """A sweep's value at each grid KL by piecewise-linear interpolation in KL.

    The sweep points ``(kl_i, value_i)`` are sorted by KL; points with equal KL are merged into one
    knot whose value is their mean.  For a grid point ``g`` with knots ``k_a <= g <= k_b``
    (adjacent)::

        f(g) = v_a + (g - k_a) / (k_b - k_a) · (v_b - v_a)      (f(g) = v_a when g = k_a)

    Grid points outside ``[min kl, max kl]`` get NaN (no extrapolation); a single-knot sweep covers
    only its own KL.

    Args:
        kl: ``(N,)`` KL of each sweep point (any order).
        value: ``(N,)`` value (gold reward, win rate, ...) of each sweep point.
        grid: ``(G,)`` KLs to read the frontier at (any order).

    Returns:
        ``(values, covered)``: float64 ``(G,)`` (NaN where not covered) and the bool mask
        ``min kl <= g <= max kl``.
    """
    k = as_float_array("kl", kl, 1)
    v = as_float_array("value", value, 1)
    g = as_float_array("grid", grid, 1)
    if k.shape != v.shape:
        raise ValueError(f"kl and value must have the same shape, got {k.shape} and {v.shape}")
    knots, inverse, counts = np.unique(k, return_inverse=True, return_counts=True)
    knot_values = np.bincount(inverse, weights=v, minlength=knots.size) / counts
    covered = (g >= knots[0]) & (g <= knots[-1])
    out = np.full(g.shape, np.nan)
    out[covered] = np.interp(g[covered], knots, knot_values)
    return out, covered


def _interp_batch(x: FloatArray, y: FloatArray, grid: FloatArray) -> FloatArray:
    """:func:`interpolate_frontier` for a batch of sweeps and several values per point.

    ``x`` is ``(B, K)`` KLs, ``y`` is ``(B, K, V)`` values; returns ``(B, G, V)``.  For each grid
    point, ``k_lo = max{x_k <= g}`` and ``k_hi = min{x_k >= g}``; the values there are the means
    over the points tied at that KL, then ``f = y_lo + (g - k_lo)/(k_hi - k_lo) · (y_hi - y_lo)``
    (``t = 0`` when ``k_lo = k_hi = g``).  NaN where ``g`` is outside ``[min x, max x]``.  Costs
    ``O(B·G·K·V)`` with no sorting, which beats per-row ``np.interp`` for the short sweeps (tens of
    runs) used here.
    """
    xb = x[:, None, :]  # (B, 1, K)
    g = grid[None, :, None]  # (1, G, 1)
    lo = np.where(xb <= g, xb, -np.inf).max(axis=2)  # (B, G)
    hi = np.where(xb >= g, xb, np.inf).min(axis=2)
    covered = np.isfinite(lo) & np.isfinite(hi)
    at_lo = (xb == lo[:, :, None]).astype(np.float64)  # (B, G, K)
    at_hi = (xb == hi[:, :, None]).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        y_lo = np.einsum("bgk,bkv->bgv", at_lo, y) / at_lo.sum(axis=2)[:, :, None]
        y_hi = np.einsum("bgk,bkv->bgv", at_hi, y) / at_hi.sum(axis=2)[:, :, None]
        width = hi - lo
        t = np.where(covered & (width > 0), (grid[None, :] - lo) / width, 0.0)
    out = y_lo + t[:, :, None] * (y_hi - y_lo)
    out[~covered] = np.nan
    return out


# --------------------------------------------------------------------------------------------
# Paired hierarchical bootstrap
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    """Point estimate and bootstrap summary, each ``(V, G)`` (metric × grid point).

    ``estimate`` is computed on the full data; ``low``/``high`` are the percentile interval of the
    replicates and ``se`` their standard deviation (``ddof=1``), both over the replicates that
    cover the grid point (NaN where none does, or where the full data does not).
    """

    estimate: FloatArray
    low: FloatArray
    high: FloatArray
    se: FloatArray


@dataclass(frozen=True)
class FrontierCI:
    """One method's frontier on the shared KL grid, next to BoN's, with bootstrap uncertainty.

    Attributes:
        grid: ``(G,)`` grid KLs.
        metrics: names of the ``V`` values (e.g. ``("gold", "win_rate")``), in row order.
        method: the method's interpolated values.
        bon: BoN's values at the grid KLs (interpolated along ``n`` when BoN's KL is resampled).
        gap: ``method - bon``, bootstrapped pairwise (same prompt draws for both when paired).
        covered: ``(G,)`` whether the full-data sweep spans the grid point.
        boot_coverage: ``(G,)`` fraction of replicates whose sweep spans it.  Below 1 (near the
            sweep's ends) the interval is conditional on coverage and less reliable.
        bon_boot_coverage: the same for BoN's curve (1 everywhere when BoN's KL is not
            resampled, e.g. analytic, and the grid lies within BoN's KLs).
        kl_estimator / bon_kl_estimator: names from :data:`KL_ESTIMATORS`.
        level, n_boot, paired: the bootstrap's settings.
    """

    grid: FloatArray
    metrics: tuple[str, ...]
    method: Interval
    bon: Interval
    gap: Interval
    covered: NDArray[np.bool_]
    boot_coverage: FloatArray
    bon_boot_coverage: FloatArray
    kl_estimator: str
    bon_kl_estimator: str
    level: float
    n_boot: int
    paired: bool

    def to_columns(self) -> dict[str, np.ndarray]:
        """Long-format columns, one row per (metric, grid point), for a table such as
        ``frontier.parquet``: ``metric, grid_index, kl, covered, boot_coverage, bon_boot_coverage``, then
        ``{method,bon,gap}_{estimate,low,high,se}``, ``kl_estimator, bon_kl_estimator, level``."""
        v, g = len(self.metrics), self.grid.size
        cols: dict[str, np.ndarray] = {
            "metric": np.repeat(np.array(self.metrics, dtype=object), g),
            "grid_index": np.tile(np.arange(g), v),
            "kl": np.tile(self.grid, v),
            "covered": np.tile(self.covered, v),
            "boot_coverage": np.tile(self.boot_coverage, v),
            "bon_boot_coverage": np.tile(self.bon_boot_coverage, v),
        }
        for prefix, iv in (("method", self.method), ("bon", self.bon), ("gap", self.gap)):
            for field in ("estimate", "low", "high", "se"):
                cols[f"{prefix}_{field}"] = getattr(iv, field).ravel()
        cols["kl_estimator"] = np.full(v * g, self.kl_estimator, dtype=object)
        cols["bon_kl_estimator"] = np.full(v * g, self.bon_kl_estimator, dtype=object)
        cols["level"] = np.full(v * g, self.level)
        return cols


def _as_rng(rng: np.random.Generator | int) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, bool) or not isinstance(rng, int | np.integer):
        raise ValueError(f"rng must be a numpy Generator or an int seed, got {rng!r}")
    return np.random.default_rng(int(rng))


def _counts(rng: np.random.Generator, rows: int, n: int) -> FloatArray:
    """``(rows, n)`` multiplicities of ``n`` indices drawn uniformly with replacement per row."""
    idx = rng.integers(0, n, size=(rows, n)) + (np.arange(rows) * n)[:, None]
    return np.bincount(idx.ravel(), minlength=rows * n).reshape(rows, n).astype(np.float64)


def _summarise(estimate: FloatArray, reps: FloatArray, level: float) -> Interval:
    """Percentile interval and SD of ``reps`` ``(B, G, V)`` around ``estimate`` ``(G, V)``;
    returned transposed to ``(V, G)``; NaN wherever ``estimate`` is NaN."""
    alpha = 1.0 - level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices, ddof >= count
        low, high = np.nanquantile(reps, [alpha / 2.0, 1.0 - alpha / 2.0], axis=0)
        se = np.nanstd(reps, axis=0, ddof=1)
    bad = np.isnan(estimate)
    for a in (low, high, se):
        a[bad] = np.nan
    return Interval(estimate.T.copy(), low.T.copy(), high.T.copy(), se.T.copy())


def _stack_metrics(
    values: Mapping[str, ArrayLike], ndim: int, shape: tuple[int, ...], what: str
) -> tuple[tuple[str, ...], FloatArray]:
    if not isinstance(values, Mapping) or not values:
        raise ValueError(f"{what} must be a non-empty mapping from metric name to array")
    names = tuple(values)
    arrays = []
    for name in names:
        a = as_float_array(f"{what}[{name!r}]", values[name], ndim)
        if a.shape != shape:
            raise ValueError(f"{what}[{name!r}] must have shape {shape}, got {a.shape}")
        arrays.append(a)
    return names, np.stack(arrays)


def bootstrap_frontier(
    kl: ArrayLike,
    values: Mapping[str, ArrayLike],
    bon_kl: ArrayLike,
    bon_values: Mapping[str, ArrayLike],
    grid: ArrayLike | None = None,
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    rng: np.random.Generator | int = 0,
    resample_seeds: bool = True,
    paired: bool = True,
    resample_bon_kl: bool = True,
    kl_estimator: str = KL_K1,
    bon_kl_estimator: str = KL_ANALYTIC_BON,
) -> FrontierCI:
    """A method's frontier and its gap to BoN on a KL grid, with a paired hierarchical bootstrap.

    Data: the method has ``R`` runs (sweep points), each trained with ``S`` seeds and evaluated on
    the ``P`` shared test prompts; ``kl[r, s, p]`` is the per-prompt KL (mean over the ``K``
    samples) and ``values[m][r, s, p]`` the per-prompt value of metric ``m`` (mean gold, win rate
    vs the reference).  BoN has ``N`` sizes with per-prompt values ``bon_values[m][i, p]`` and KL
    ``bon_kl[i]`` (analytic, prompt-free) or ``bon_kl[i, p]``.

    Estimate (full data): run ``r``'s point is ``(mean_{s,p} kl[r,s,p], mean_{s,p} values[r,s,p])``;
    BoN's is ``(mean_p bon_kl[i,p], mean_p bon_values[i,p])``; both are read at the grid KLs with
    :func:`interpolate_frontier` and ``gap = method - BoN``.

    One replicate ``b`` draws prompt multiplicities ``c_p`` (``P`` indices with replacement) shared
    by every run and by BoN (``paired=False`` draws BoN's independently), and for each run
    independently seed multiplicities ``d_rs`` (``S`` indices with replacement; all ones when
    ``resample_seeds=False``), then::

        KL_r* = Σ_s d_rs Σ_p c_p kl[r,s,p] / (S P)        (same for each value)
        BoN_i* = Σ_p c'_p bon[i,p] / P                    (c' = c when paired)

    and interpolates as above (same grid, duplicate KLs averaged).  A per-prompt BoN KL is
    resampled too unless ``resample_bon_kl=False`` (then its full-data mean is kept); rows that
    are constant over prompts stay exact.  Resampled, BoN's largest KL falls short of the default
    grid's last point in about half the replicates (see ``bon_boot_coverage``).  Per grid point and metric the
    result holds the estimate, the percentile interval ``[q_{(1-level)/2}, q_{(1+level)/2}]`` and
    the SD of the replicates (the bootstrap SE) for the method, BoN and the gap.  Pairing makes the
    gap's variance ``Var(M) + Var(B) - 2 Cov(M, B)``, much smaller when both follow prompt
    difficulty.  Resampling both prompts and seeds of a crossed design counts the seed×prompt
    interaction twice, so the interval is slightly conservative; with few seeds (``S = 3``) the
    seed level's variance is itself poorly estimated (``(S-1)/S`` shrinkage, few distinct draws).

    Cost: per replicate one ``(P) @ (P, (1+V)·R·S)`` product and ``O(G·R·V)`` interpolation, in
    blocks of replicates; 1000 × 10 runs × 3 seeds × 500 prompts takes well under a second.

    Args:
        kl: ``(R, S, P)`` per-prompt KL of each run and seed.
        values: metric name -> ``(R, S, P)`` per-prompt values.
        bon_kl: ``(N,)`` or ``(N, P)`` BoN KL.
        bon_values: same metric names -> ``(N, P)`` per-prompt BoN values.
        grid: ``(G,)`` grid KLs; default: BoN's full-data KLs.
        n_boot: number of replicates, ``>= 2``.
        level: interval level in ``(0, 1)``.
        rng: a ``numpy.random.Generator`` or an int seed (deterministic either way).
        resample_seeds: resample training seeds within each run.
        paired: resample BoN's prompts with the method's indices.
        resample_bon_kl: resample a per-prompt ``bon_kl`` (no effect for an ``(N,)`` one).
        kl_estimator / bon_kl_estimator: names from :data:`KL_ESTIMATORS`, carried to the result.
    """
    kl_arr = as_float_array("kl", kl, 3)
    r, s, p = kl_arr.shape
    names, vals = _stack_metrics(values, 3, (r, s, p), "values")
    bon_kl_arr = np.asarray(bon_kl)
    bon_kl_arr = as_float_array("bon_kl", bon_kl_arr, 2 if bon_kl_arr.ndim == 2 else 1)
    n_bon = bon_kl_arr.shape[0]
    if bon_kl_arr.ndim == 2 and bon_kl_arr.shape != (n_bon, p):
        raise ValueError(f"bon_kl must be (N,) or (N, P) with P = {p}, got {bon_kl_arr.shape}")
    if not isinstance(bon_values, Mapping) or set(bon_values) != set(names):
        got = sorted(bon_values) if isinstance(bon_values, Mapping) else type(bon_values)
        raise ValueError(f"bon_values must have the same metrics as values: {list(names)}, "
                         f"got {got}")
    _, bon_vals = _stack_metrics({m: bon_values[m] for m in names}, 2, (n_bon, p), "bon_values")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int | np.integer) or n_boot < 2:
        raise ValueError(f"n_boot must be an integer >= 2, got {n_boot!r}")
    if not (0.0 < level < 1.0):
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    check_kl_estimator(kl_estimator)
    check_kl_estimator(bon_kl_estimator)
    gen = _as_rng(rng)
    v = len(names)

    # Method: (1+V, R, S, P) -> (P, (1+V)·R·S); BoN: rows are values (and KL when per prompt).
    method_mat = np.concatenate([kl_arr[None], vals]).reshape(-1, p).T
    if bon_kl_arr.ndim == 2 and not resample_bon_kl:
        bon_kl_arr = bon_kl_arr.mean(axis=1)
    bon_kl_fixed = bon_kl_arr.ndim == 1
    # Rows constant over prompts: keep them exact (a weighted mean of copies can be off by an ulp,
    # which would move a grid point just outside BoN's range).
    bon_kl_const = None if bon_kl_fixed else np.ptp(bon_kl_arr, axis=1) == 0
    bon_rows = bon_vals if bon_kl_fixed else np.concatenate([bon_kl_arr[None], bon_vals])
    bon_mat = bon_rows.reshape(-1, p).T

    def method_points(cp: FloatArray, ds: FloatArray) -> tuple[FloatArray, FloatArray]:
        """(B, R) KLs and (B, R, V) values from prompt counts (B, P) and seed counts (B, R, S)."""
        per_seed = (cp @ method_mat).reshape(-1, 1 + v, r, s) / p
        per_run = np.einsum("bxrs,brs->bxr", per_seed, ds) / s
        return per_run[:, 0], per_run[:, 1:].transpose(0, 2, 1)

    def bon_points(cp: FloatArray) -> tuple[FloatArray, FloatArray]:
        """(B, N) KLs and (B, N, V) values from prompt counts (B, P)."""
        means = (cp @ bon_mat).reshape(cp.shape[0], -1, n_bon) / p
        if bon_kl_fixed:
            return np.broadcast_to(bon_kl_arr, (cp.shape[0], n_bon)), means.transpose(0, 2, 1)
        kls = np.where(bon_kl_const[None, :], bon_kl_arr[:, 0][None, :], means[:, 0])
        return kls, means[:, 1:].transpose(0, 2, 1)

    ones_p = np.ones((1, p))
    bon_full_kl, bon_full_vals = bon_points(ones_p)
    grid_arr = bon_full_kl[0].copy() if grid is None else as_float_array("grid", grid, 1)
    m_kl, m_vals = method_points(ones_p, np.ones((1, r, s)))
    method_est = _interp_batch(m_kl, m_vals, grid_arr)[0]  # (G, V)
    bon_est = _interp_batch(bon_full_kl, bon_full_vals, grid_arr)[0]
    covered = np.isfinite(method_est[:, 0])

    g = grid_arr.size
    method_reps = np.empty((n_boot, g, v))
    bon_reps = np.empty((n_boot, g, v))
    per_rep = max(p, (1 + v) * r * s, g * max(r, n_bon) * (v + 1))
    block = max(1, _BLOCK_ELEMENTS // per_rep)
    for start in range(0, n_boot, block):
        b = min(block, n_boot - start)
        cp = _counts(gen, b, p)
        ds = (_counts(gen, b * r, s).reshape(b, r, s) if resample_seeds
              else np.ones((b, r, s)))
        cb = cp if paired else _counts(gen, b, p)
        method_reps[start:start + b] = _interp_batch(*method_points(cp, ds), grid_arr)
        bon_reps[start:start + b] = _interp_batch(*bon_points(cb), grid_arr)

    with np.errstate(invalid="ignore"):
        boot_coverage = np.isfinite(method_reps[:, :, 0]).mean(axis=0)
        bon_boot_coverage = np.isfinite(bon_reps[:, :, 0]).mean(axis=0)
    return FrontierCI(
        grid=grid_arr,
        metrics=names,
        method=_summarise(method_est, method_reps, level),
        bon=_summarise(bon_est, bon_reps, level),
        gap=_summarise(method_est - bon_est, method_reps - bon_reps, level),
        covered=covered,
        boot_coverage=boot_coverage,
        bon_boot_coverage=bon_boot_coverage,
        kl_estimator=kl_estimator,
        bon_kl_estimator=bon_kl_estimator,
        level=float(level),
        n_boot=int(n_boot),
        paired=bool(paired),
    )


# --------------------------------------------------------------------------------------------
# Pareto flags
# --------------------------------------------------------------------------------------------


def _check_points(kl: ArrayLike, value: ArrayLike) -> tuple[FloatArray, FloatArray]:
    k = as_float_array("kl", kl, 1)
    v = as_float_array("value", value, 1)
    if k.shape != v.shape:
        raise ValueError(f"kl and value must have the same shape, got {k.shape} and {v.shape}")
    return k, v


def _check_se(name: str, se: ArrayLike | None, n: int) -> FloatArray:
    if se is None:
        return np.zeros(n)
    arr = as_float_array(name, se, 1)
    if arr.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {arr.shape}")
    if (arr < 0).any():
        raise ValueError(f"{name} must be >= 0")
    return arr


def pareto_flags(kl: ArrayLike, value: ArrayLike) -> NDArray[np.bool_]:
    """Mask of points on the (KL, value) Pareto frontier, ignoring uncertainty.

    Lower KL and higher value are better.  Point ``i`` is dominated iff some ``j`` has
    ``kl_j <= kl_i`` and ``value_j >= value_i`` with at least one strict (identical points do not
    dominate each other).  Brute force over all pairs, ``O(N²)`` (same rule as
    ``pipeline_lib/math/winrate.py::pareto_frontier``).
    """
    k, v = _check_points(kl, value)
    kj, ki = k[None, :], k[:, None]  # [i, j]
    vj, vi = v[None, :], v[:, None]
    dominated = (kj <= ki) & (vj >= vi) & ((kj < ki) | (vj > vi))
    return ~dominated.any(axis=1)


def pareto_flags_se(
    kl: ArrayLike,
    value: ArrayLike,
    value_se: ArrayLike | None = None,
    kl_se: ArrayLike | None = None,
    *,
    z: float = 1.96,
) -> NDArray[np.bool_]:
    """Mask of points not *confidently* dominated on the (KL, value) frontier.

    With ``σᵛ_ij = sqrt(value_se_i² + value_se_j²)`` and ``σᴷ_ij = sqrt(kl_se_i² + kl_se_j²)``,
    point ``i`` is dominated iff some ``j ≠ i`` has::

        kl_j + z·σᴷ_ij <= kl_i   and   value_j - z·σᵛ_ij >= value_i,   one of them strict,

    i.e. ``j`` beats ``i`` in both coordinates by more than ``z`` standard errors of the
    difference (independent errors assumed).  A point whose shortfall is within the noise stays on
    the frontier, so the flag is conservative: more points are kept as ``z`` grows, and ``z = 0``
    (or all SEs zero) gives exactly :func:`pareto_flags`.  ``kl_se=None`` treats KL as known (right
    for the analytic BoN KL; for sampled ``k1``/``k3`` KLs pass their SE).  ``O(N²)``.
    """
    k, v = _check_points(kl, value)
    vse = _check_se("value_se", value_se, k.size)
    kse = _check_se("kl_se", kl_se, k.size)
    if not (np.isfinite(z) and z >= 0):
        raise ValueError(f"z must be finite and >= 0, got {z!r}")
    kl_margin = z * np.sqrt(kse[:, None] ** 2 + kse[None, :] ** 2)  # [i, j]
    v_margin = z * np.sqrt(vse[:, None] ** 2 + vse[None, :] ** 2)
    kj = k[None, :] + kl_margin  # j's KL, made worse by the margin
    vj = v[None, :] - v_margin  # j's value, made worse by the margin
    ki, vi = k[:, None], v[:, None]
    dominated = (kj <= ki) & (vj >= vi) & ((kj < ki) | (vj > vi))
    np.fill_diagonal(dominated, False)
    return ~dominated.any(axis=1)
