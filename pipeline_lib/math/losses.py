"""Per-example training losses: DPO, IPO, BoNBoN, BoN-SFT, BOND and Bradley-Terry.

All functions are pure (no I/O) and operate on torch tensors. Policy/reference inputs are the
*summed* sequence log-probabilities log pi(y|x) of shape ``(B,)``; every loss returns the
per-example loss of shape ``(B,)`` so the caller chooses the reduction (mean, weighted, ...).
BOND is the exception: its two terms are per-token means (:func:`token_mean_nll`,
:func:`bond_loss`), on the scale of the PPO surrogate it is mixed with.

Notation (see ``docs/METHODS.md``, "Preference losses"): the policy log-ratio is

    h(y) = log pi_theta(y|x) - log pi_ref(y|x),      Delta = h(y_w) - h(y_l),

with y_w the chosen (preferred / best-of-n) and y_l the rejected (worst-of-n) response.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BONBON_VARIANTS = ("ipo", "dpo_sigmoid")


def _check_same_shape(**tensors: torch.Tensor) -> None:
    """Raise ``ValueError`` naming the first argument whose shape differs from the first one."""
    items = list(tensors.items())
    ref_name, ref = items[0]
    for name, t in items[1:]:
        if tuple(t.shape) != tuple(ref.shape):
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but {ref_name} has shape {tuple(ref.shape)}; "
                "all inputs must have the same shape (B,)"
            )


def _check_positive(name: str, value: float) -> None:
    if not (value > 0) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_unit_interval(name: str, value: float, hi: float = 1.0) -> None:
    if not (0.0 <= value <= hi):
        raise ValueError(f"{name} must lie in [0, {hi}], got {value!r}")


def _log_ratio_margin(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
) -> torch.Tensor:
    """Delta = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)), shape (B,)."""
    _check_same_shape(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        reference_chosen_logps=reference_chosen_logps,
        reference_rejected_logps=reference_rejected_logps,
    )
    return (policy_chosen_logps - reference_chosen_logps) - (
        policy_rejected_logps - reference_rejected_logps
    )


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per-example DPO loss with optional label smoothing (conservative DPO).

        L = -(1 - eps) * log sigma(beta * Delta) - eps * log sigma(-beta * Delta),

    Delta = h(y_w) - h(y_l), h = log pi - log pi_ref. Computed with ``F.logsigmoid`` so it is
    finite for any margin. At Delta = 0 the loss is log 2 whatever eps is.

    Args:
        policy_chosen_logps: summed log pi_theta(y_w|x), shape (B,).
        policy_rejected_logps: summed log pi_theta(y_l|x), shape (B,).
        reference_chosen_logps: summed log pi_ref(y_w|x), shape (B,).
        reference_rejected_logps: summed log pi_ref(y_l|x), shape (B,).
        beta: KL coefficient, > 0.
        label_smoothing: eps in [0, 0.5], the assumed probability that a label is flipped.

    Returns:
        Per-example loss, shape (B,).
    """
    _check_positive("beta", beta)
    _check_unit_interval("label_smoothing", label_smoothing, hi=0.5)
    logits = beta * _log_ratio_margin(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    loss = -F.logsigmoid(logits)
    if label_smoothing > 0.0:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-logits)
    return loss


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Per-example IPO loss (Azar et al. 2023) on summed log-ratios.

        L = (Delta - 1 / (2 beta))^2,   Delta = h(y_w) - h(y_l).

    Zero exactly when the log-ratio margin reaches the target 1/(2 beta).

    Returns:
        Per-example loss, shape (B,).
    """
    _check_positive("beta", beta)
    margin = _log_ratio_margin(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    return (margin - 1.0 / (2.0 * beta)) ** 2


def harmonic_number(m: int) -> float:
    """H_m = sum_{k=1}^{m} 1/k as a float, with H_0 = 0.

    Raises:
        ValueError: if ``m`` is not a non-negative integer.
    """
    if isinstance(m, bool) or not isinstance(m, int) or m < 0:
        raise ValueError(f"m must be a non-negative integer, got {m!r}")
    return math.fsum(1.0 / k for k in range(1, m + 1))


def bonbon_beta(n: int) -> float:
    """BoNBoN's implied KL coefficient beta* = 1 / (2 (n - 1) H_{n-1}).

    With this beta the IPO target 1/(2 beta*) = (n - 1) H_{n-1} is the expected log-ratio gap
    between the best and worst of n samples under the BoN distribution (18.15 at n = 8, where
    beta* ~= 0.0275482).

    Raises:
        ValueError: if ``n`` is not an integer >= 2.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an integer >= 2, got {n!r}")
    return 1.0 / (2.0 * (n - 1) * harmonic_number(n - 1))


def bonbon_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    n: int,
    alpha: float,
    chosen_nll: torch.Tensor | None = None,
    variant: str = "ipo",
) -> torch.Tensor:
    """Per-example BoNBoN loss on (best-of-n, worst-of-n) pairs.

    Paper form (``variant="ipo"``, the default):

        L = alpha * L_SFT(y_best) + (1 - alpha) * (Delta - 1 / (2 beta*))^2,
        beta* = 1 / (2 (n - 1) H_{n-1}),   Delta = h(y_best) - h(y_worst),

    where L_SFT is the *summed* (not length-averaged) negative log-likelihood of the best response.
    By default ``chosen_nll = -policy_chosen_logps`` (the summed log-prob already is the SFT term);
    pass ``chosen_nll`` explicitly to use a different SFT term.

    ``variant="dpo_sigmoid"`` reproduces the public BoNBoN trainer *as shipped*, which computes the
    DPO sigmoid term in place of the paper's squared IPO term:

        L = alpha * L_SFT(y_best) + (1 - alpha) * (-log sigma(beta* * Delta)).

    Use it only to reproduce numbers from that code; the paper's IPO form is the clean method.

    Args:
        policy_chosen_logps: summed log pi_theta(y_best|x), shape (B,).
        policy_rejected_logps: summed log pi_theta(y_worst|x), shape (B,).
        reference_chosen_logps: summed log pi_ref(y_best|x), shape (B,).
        reference_rejected_logps: summed log pi_ref(y_worst|x), shape (B,).
        n: BoN size, integer >= 2 (sets beta*).
        alpha: SFT weight in [0, 1].
        chosen_nll: optional per-example SFT loss of the best response, shape (B,).
        variant: ``"ipo"`` (paper) or ``"dpo_sigmoid"`` (shipped trainer).

    Returns:
        Per-example loss, shape (B,).
    """
    _check_unit_interval("alpha", alpha)
    if variant not in BONBON_VARIANTS:
        raise ValueError(f"variant must be one of {BONBON_VARIANTS}, got {variant!r}")
    beta_star = bonbon_beta(n)
    if chosen_nll is None:
        chosen_nll = -policy_chosen_logps
    else:
        _check_same_shape(policy_chosen_logps=policy_chosen_logps, chosen_nll=chosen_nll)
    args = (
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
    )
    if variant == "ipo":
        pair = ipo_loss(*args, beta=beta_star)
    else:
        pair = dpo_loss(*args, beta=beta_star)
    return alpha * chosen_nll + (1.0 - alpha) * pair


def sft_loss(policy_logps: torch.Tensor) -> torch.Tensor:
    """BoN-SFT loss: the summed negative log-likelihood of the best-of-n response.

    L = -log pi_theta(y_best|x)   (per example, shape (B,)).
    """
    return -policy_logps


def token_mean_nll(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """BOND's forward (BoN-SFT) term: the negative log-likelihood per target token,

        NLL_tok = -sum_{b,t} mask_bt * log pi(y_bt) / sum_{b,t} mask_bt,

    a scalar: the same token-level mean (over every valid token of the minibatch) as the PPO
    surrogate of the backward term (``ppo_math.masked_mean``), so that the two terms of
    :func:`bond_loss` are on one scale (docs/METHODS.md, "BOND"). ``token_logps`` and ``mask``
    are (B, T); positions with mask 0 do not count, even if their log-prob is -inf.
    """
    if tuple(token_logps.shape) != tuple(mask.shape) or token_logps.dim() != 2:
        raise ValueError(f"token_logps {tuple(token_logps.shape)} and mask {tuple(mask.shape)} "
                         "must both be (B, T)")
    count = mask.to(token_logps.dtype).sum()
    if not float(count) > 0:
        raise ValueError("token_mean_nll needs at least one target token (mask is all 0)")
    kept = torch.where(mask.bool(), token_logps, torch.zeros_like(token_logps))
    return -kept.sum() / count


def bond_loss(forward_nll: torch.Tensor, backward_loss: torch.Tensor, w: float) -> torch.Tensor:
    """BOND Jeffreys-divergence mix of a forward and a backward term.

        L = (1 - w) * L_forward + w * L_backward,   w in [0, 1].

    ``forward_nll`` is the forward-KL (SFT-like, mode-covering) term and ``backward_loss`` the
    backward-KL (mode-seeking) term, of the same shape (scalars in the PPO trainer, or per
    example). The caller puts both on one scale: in the PPO trainer the per-token
    :func:`token_mean_nll` against the token-mean PPO loss; a summed sequence NLL (tens of
    nats) against a token-mean surrogate would make any w < 1 nearly pure BoN-SFT.
    """
    _check_unit_interval("w", w)
    _check_same_shape(forward_nll=forward_nll, backward_loss=backward_loss)
    return (1.0 - w) * forward_nll + w * backward_loss


def bradley_terry_loss(
    chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, center_coef: float = 0.0
) -> torch.Tensor:
    """Pairwise Bradley-Terry reward-model loss, optionally with a centering penalty.

        L = -log sigma(s_w - s_l) + center_coef * 0.5 * (s_w^2 + s_l^2)

    ``docs/METHODS.md`` suggests ``center_coef = 0.001`` when the penalty is used.

    Returns:
        Per-example loss, shape (B,).
    """
    if not (center_coef >= 0) or not math.isfinite(center_coef):
        raise ValueError(f"center_coef must be a finite number >= 0, got {center_coef!r}")
    _check_same_shape(chosen_scores=chosen_scores, rejected_scores=rejected_scores)
    loss = -F.logsigmoid(chosen_scores - rejected_scores)
    if center_coef > 0.0:
        loss = loss + center_coef * 0.5 * (chosen_scores**2 + rejected_scores**2)
    return loss
