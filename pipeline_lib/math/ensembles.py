"""Reward-model ensemble objectives (pure numpy, no I/O).

Per response, k member rewards r_1..r_k:

* ``mean``: (1/k) Σ r_i
* ``wco`` (worst-case optimisation): min_i r_i
* ``uwo`` (uncertainty-weighted optimisation): mean − λ·Var_i(r_i), population variance

Members can first be z-normalised against the reference reward distribution (each member's
mean and standard deviation over the reference policy's cached samples), which puts members
trained with different seeds on one scale before they are combined.
"""

from __future__ import annotations

import numpy as np

OBJECTIVES = ("mean", "wco", "uwo")


def _check_members(member_rewards: np.ndarray, name: str = "member_rewards") -> np.ndarray:
    r = np.asarray(member_rewards, dtype=np.float64)
    if r.ndim != 2 or r.shape[0] == 0:
        raise ValueError(f"{name} must have shape (k, N) with k >= 1, got {r.shape}")
    if not np.all(np.isfinite(r)):
        bad = np.argwhere(~np.isfinite(r))[0]
        raise ValueError(
            f"{name} has non-finite values (first at member {bad[0]}, response {bad[1]})"
        )
    return r


def ensemble(member_rewards: np.ndarray, objective: str, uwo_lambda: float = 0.5) -> np.ndarray:
    """Combine k members' rewards (shape (k, N)) into one proxy reward per response (N,)."""
    r = _check_members(member_rewards)
    if objective == "mean":
        return r.mean(axis=0)
    if objective == "wco":
        return r.min(axis=0)
    if objective == "uwo":
        if not np.isfinite(uwo_lambda) or uwo_lambda < 0:
            raise ValueError(f"uwo_lambda must be a finite number >= 0, got {uwo_lambda}")
        return r.mean(axis=0) - uwo_lambda * r.var(axis=0)  # population variance (ddof=0)
    raise ValueError(f"unknown ensemble objective {objective!r}; expected one of {OBJECTIVES}")


def member_stats(reference_rewards: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-member mean and standard deviation (shape (k,) each) of the reference rewards."""
    r = _check_members(reference_rewards, "reference_rewards")
    mean, std = r.mean(axis=1), r.std(axis=1)
    if np.any(std == 0):
        raise ValueError(
            f"member(s) {np.flatnonzero(std == 0).tolist()} give a constant reward on the "
            "reference samples; cannot z-normalise"
        )
    return mean, std


def zscore_members(
    member_rewards: np.ndarray, mean: np.ndarray, std: np.ndarray
) -> np.ndarray:
    """(r_i − mean_i) / std_i per member, with stats from :func:`member_stats`."""
    r = _check_members(member_rewards)
    mean = np.asarray(mean, dtype=np.float64).reshape(-1, 1)
    std = np.asarray(std, dtype=np.float64).reshape(-1, 1)
    if mean.shape[0] != r.shape[0] or std.shape[0] != r.shape[0]:
        raise ValueError(f"stats for {mean.shape[0]} members, rewards for {r.shape[0]}")
    return (r - mean) / std
