"""The KL estimators, one meaning each. ``kl_k1`` and ``kl_k3`` are elementwise estimators of
KL(pi || pi_ref) from log-probs of samples y ~ pi (per token, or per sequence when given
sequence log-probs), on torch tensors or numpy arrays alike; :func:`mean_and_se` and
:func:`k3_token_mean` average them."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from pipeline_lib.math.bon import as_float_array


def _pair(logp, ref_logp):
    if hasattr(logp, "expm1"):  # torch tensors: keep them (and their autograd graph)
        return logp, ref_logp
    a, b = np.asarray(logp, dtype=np.float64), np.asarray(ref_logp, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"log-probs of the policy and the reference must have the same shape, "
                         f"got {a.shape} and {b.shape}")
    return a, b


def kl_k1(logp, ref_logp):
    """k1 = log pi - log pi_ref, elementwise (unbiased for the KL, can be < 0)."""
    logp, ref_logp = _pair(logp, ref_logp)
    return logp - ref_logp


def kl_k3(logp, ref_logp):
    """k3 = exp(r) - 1 - r with r = log pi_ref - log pi, elementwise (unbiased, always >= 0
    up to round-off)."""
    logp, ref_logp = _pair(logp, ref_logp)
    r = ref_logp - logp
    return (r.expm1() if hasattr(r, "expm1") else np.expm1(r)) - r


def mean_and_se(values: ArrayLike) -> tuple[float, float]:
    """Mean of per-sample estimates (e.g. ``kl_k1`` of sequence log-probs of y ~ pi) and its
    standard error ``std(ddof=1) / sqrt(N)`` (NaN for N = 1).

    A k1 mean is unbiased but high-variance: it **can be negative** from sampling noise even
    though the KL is not."""
    x = as_float_array("values", values, 1)
    se = float(x.std(ddof=1) / np.sqrt(x.size)) if x.size > 1 else float("nan")
    return float(x.mean()), se


def k3_token_mean(
    logp_policy_tok: ArrayLike, logp_ref_tok: ArrayLike, mask: ArrayLike | None = None
) -> float:
    """k3 (Schulman) estimate of the per-token ``KL(π ‖ π_ref)``: mean over valid tokens.

    With ``d = log π_ref(y_t|·) - log π(y_t|·)`` for tokens of samples ``y ~ π``::

        k3 = exp(d) - 1 - d   (computed as expm1(d) - d)

    Each term is ``>= 0`` and unbiased for the per-token KL (``E_π[exp(d)] = 1``); the result is
    the mean over all valid tokens (multiply by the mean length for a per-sequence figure).
    Positions where ``mask`` is false are ignored (they may hold padding, even non-finite values).

    Args:
        logp_policy_tok: per-token log-probs under the policy, any shape (typically ``(B, T)``).
        logp_ref_tok: per-token log-probs under the reference, same shape.
        mask: same shape, true/nonzero for valid tokens; ``None`` means all valid.
    """
    pol = np.asarray(logp_policy_tok, dtype=np.float64)
    ref = np.asarray(logp_ref_tok, dtype=np.float64)
    if pol.shape != ref.shape:
        raise ValueError(
            "logp_policy_tok and logp_ref_tok must have the same shape, "
            f"got {pol.shape} and {ref.shape}"
        )
    if mask is None:
        valid = np.ones(pol.shape, dtype=bool)
    else:
        valid = np.asarray(mask)
        if valid.shape != pol.shape:
            raise ValueError(
                f"mask must have the shape of the log-probs {pol.shape}, got {valid.shape}"
            )
        valid = valid.astype(bool)
    if not valid.any():
        raise ValueError("mask selects no tokens")
    d = ref[valid] - pol[valid]
    if not np.isfinite(d).all():
        raise ValueError("logp_policy_tok and logp_ref_tok must be finite at valid tokens")
    k3 = np.maximum(kl_k3(pol[valid], ref[valid]), 0.0)  # clip round-off below zero
    return float(k3.mean())
