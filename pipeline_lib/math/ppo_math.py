"""PPO arithmetic on (B, T) token tensors: masked means, whitening, token rewards with the KL
penalty, GAE, clipped policy and value losses, KL controllers, the learning-rate schedule,
entropy. Pure torch."""

from __future__ import annotations

import math

import torch


def _check_token_shapes(**tensors: torch.Tensor) -> None:
    items = list(tensors.items())
    ref_name, ref = items[0]
    if ref.dim() != 2:
        raise ValueError(f"{ref_name} must have shape (B, T), got {tuple(ref.shape)}")
    for name, t in items[1:]:
        if tuple(t.shape) != tuple(ref.shape):
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but {ref_name} has shape {tuple(ref.shape)}"
            )


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Masked mean  sum(x * mask) / sum(mask)  over all elements, or along ``dim``.

    Positions with mask 0 do not contribute (even if ``x`` is nan/inf there).
    """
    if tuple(x.shape) != tuple(mask.shape):
        raise ValueError(f"mask has shape {tuple(mask.shape)} but x has shape {tuple(x.shape)}")
    m = mask.to(x.dtype)
    xm = torch.where(mask.bool(), x, torch.zeros_like(x))
    if dim is None:
        return xm.sum() / m.sum()
    return xm.sum(dim=dim) / m.sum(dim=dim)


def _masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        count = mask.to(x.dtype).sum()
        if count <= 1:
            raise ValueError("whiten needs at least two valid (mask == 1) elements")
        var = var * count / (count - 1)
    return var


def whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    moments: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Masked whitening: (x - mean) / sqrt(var + eps) over the valid (mask == 1) entries.

    mean and (Bessel-corrected) var are masked statistics over the whole batch, or the given
    ``moments`` = (mean, var) (e.g. over the rollouts of every process). With
    ``shift_mean=False`` the mean is added back (scale only), as for PPO rewards. Masked-out
    positions are set to 0.
    """
    if moments is None:
        mean, var = masked_mean(x, mask), _masked_var(x, mask)
    else:
        mean = torch.as_tensor(moments[0], dtype=x.dtype, device=x.device)
        var = torch.as_tensor(moments[1], dtype=x.dtype, device=x.device)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, torch.zeros_like(out))


def gae_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded token sequences.

        delta_t = r_t + gamma * V_{t+1} - V_t,        A_t = delta_t + gamma * lam * A_{t+1},

    with V_{t+1} = A_{t+1} = 0 after the last valid token (the episode terminates there), and
    returns R_t = A_t + V_t. Vectorised over the batch; the loop runs backwards over T.
    The result is detached (targets, not part of the graph).

    Args:
        rewards: per-token rewards, shape (B, T).
        values: value-head estimates, shape (B, T).
        mask: 1 on valid response tokens (right-padded), shape (B, T).
        gamma: discount in [0, 1].
        lam: GAE lambda in [0, 1].

    Returns:
        (advantages, returns), each (B, T) and zero where mask == 0.
    """
    _check_token_shapes(rewards=rewards, values=values, mask=mask)
    if not (0.0 <= gamma <= 1.0):
        raise ValueError(f"gamma must lie in [0, 1], got {gamma!r}")
    if not (0.0 <= lam <= 1.0):
        raise ValueError(f"lam must lie in [0, 1], got {lam!r}")
    m = mask.to(rewards.dtype)
    r = rewards.detach() * m
    v = values.detach().to(rewards.dtype) * m
    _, t_len = r.shape
    adv = torch.zeros_like(r)
    next_adv = torch.zeros_like(r[:, 0])
    next_value = torch.zeros_like(r[:, 0])
    for t in reversed(range(t_len)):
        delta = r[:, t] + gamma * next_value - v[:, t]
        cur = (delta + gamma * lam * next_adv) * m[:, t]
        adv[:, t] = cur
        next_adv = cur
        next_value = v[:, t]
    returns = (adv + v) * m
    return adv, returns


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped PPO surrogate (Schulman et al. 2017), per-token, masked mean.

        ratio = exp(logp - logp_old)
        L = mean_mask( max(-A * ratio, -A * clip(ratio, 1 - c, 1 + c)) )

    Returns:
        (loss, clipfrac, approx_kl): ``loss`` is a scalar with gradient w.r.t. ``logprobs``;
        ``clipfrac`` = fraction of valid tokens where the clipped term is active;
        ``approx_kl`` = 0.5 * mean_mask((logp - logp_old)^2) (both detached).
    """
    _check_token_shapes(
        logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask
    )
    _check_clip(clip)
    log_ratio = logprobs - old_logprobs.detach()
    ratio = torch.exp(log_ratio)
    adv = advantages.detach()
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(pg1, pg2), mask)
    with torch.no_grad():
        clipfrac = masked_mean((pg2 > pg1).to(logprobs.dtype), mask)
        approx_kl = 0.5 * masked_mean(log_ratio**2, mask)
    return loss, clipfrac, approx_kl


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss.

        v_clip = v_old + clip(v - v_old, -c, c)
        L = 0.5 * mean_mask( max((v - R)^2, (v_clip - R)^2) )

    Returns:
        (loss, clipfrac): scalar loss and the (detached) fraction of valid tokens where the
        clipped error is the larger one.
    """
    _check_token_shapes(values=values, old_values=old_values, returns=returns, mask=mask)
    _check_clip(clip)
    old = old_values.detach()
    ret = returns.detach()
    v_clipped = old + torch.clamp(values - old, -clip, clip)
    err1 = (values - ret) ** 2
    err2 = (v_clipped - ret) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err1, err2), mask)
    with torch.no_grad():
        clipfrac = masked_mean((err2 > err1).to(values.dtype), mask)
    return loss, clipfrac


def _check_clip(clip: float) -> None:
    if not (clip > 0) or not math.isfinite(clip):
        raise ValueError(f"clip must be a finite number > 0, got {clip!r}")


def token_rewards(
    sequence_reward: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    reward_clip: float | None = None,
) -> torch.Tensor:
    """Per-token PPO rewards: KL penalty at every valid token, sequence reward at the last.

        r_t = -kl_coef * (log pi(y_t) - log pi_ref(y_t))             for valid t,
        r_{t_last} += clip(R(y), -reward_clip, reward_clip)            (clip optional),

    t_last = the last valid token of each right-padded row; 0 where mask == 0. Detached.

    Args:
        sequence_reward: one reward per sequence, shape (B,).
        logprobs, ref_logprobs: per-token log-probs of the sampled tokens, shape (B, T).
        mask: 1 on valid response tokens, right-padded, shape (B, T); every row needs >= 1.
        kl_coef: beta >= 0.
        reward_clip: optional bound > 0 on |R(y)|.

    Returns:
        (B, T) rewards.
    """
    _check_token_shapes(logprobs=logprobs, ref_logprobs=ref_logprobs, mask=mask)
    if tuple(sequence_reward.shape) != (logprobs.shape[0],):
        raise ValueError(
            f"sequence_reward must have shape ({logprobs.shape[0]},), "
            f"got {tuple(sequence_reward.shape)}"
        )
    if not (kl_coef >= 0) or not math.isfinite(kl_coef):
        raise ValueError(f"kl_coef must be a finite number >= 0, got {kl_coef!r}")
    if reward_clip is not None and not (reward_clip > 0):
        raise ValueError(f"reward_clip must be > 0 or None, got {reward_clip!r}")
    lengths = mask.to(torch.long).sum(dim=1)
    if torch.any(lengths == 0):
        raise ValueError("mask has a row with no valid token")
    m = mask.to(logprobs.dtype)
    rewards = (-kl_coef * (logprobs.detach() - ref_logprobs.detach())) * m
    seq = sequence_reward.detach().to(rewards.dtype)
    if reward_clip is not None:
        seq = torch.clamp(seq, -reward_clip, reward_clip)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, lengths - 1] += seq
    return rewards


LR_SCHEDULES = ("constant", "linear", "cosine")


def scheduled_lr(lr: float, step: int, total: int, schedule: str,
                 final_fraction: float = 0.0) -> float:
    """The learning rate of PPO iteration ``step`` (0-based) of ``total``.

    With progress p = step / total (0 at the first iteration, (total - 1)/total at the last)
    and f = ``final_fraction``:

        constant:  lr
        linear:    lr · (1 − (1 − f)·p)
        cosine:    lr · (f + (1 − f)·(1 + cos(π·p))/2)

    so a decaying schedule reaches ``f · lr`` just after the last iteration (as TRL's linear
    schedule reaches 0). A function of the step alone, so a resumed run continues the schedule
    with no scheduler state to save.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    if not 0.0 <= final_fraction <= 1.0:
        raise ValueError(f"final_fraction must lie in [0, 1], got {final_fraction!r}")
    if total < 1 or not 0 <= step < total:
        raise ValueError(f"step must lie in [0, total), got step={step}, total={total}")
    if schedule == "constant":
        return float(lr)
    p = step / total
    if schedule == "linear":
        return float(lr) * (1.0 - (1.0 - final_fraction) * p)
    return float(lr) * (final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + math.cos(math.pi * p)))


class FixedKLController:
    """Constant KL coefficient with the controller API (``.value``, ``.update``)."""

    def __init__(self, kl_coef: float) -> None:
        if not (kl_coef >= 0) or not math.isfinite(kl_coef):
            raise ValueError(f"kl_coef must be a finite number >= 0, got {kl_coef!r}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        """No-op; returns the (unchanged) coefficient."""
        return self.value


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. (2019).

        e = clip(KL / target - 1, -0.2, 0.2),      beta <- beta * (1 + e * n_steps / horizon)

    so beta grows when the measured KL exceeds the target and shrinks when below it.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if not (init_kl_coef > 0) or not math.isfinite(init_kl_coef):
            raise ValueError(f"init_kl_coef must be a finite number > 0, got {init_kl_coef!r}")
        if not (target > 0) or not math.isfinite(target):
            raise ValueError(f"target must be a finite number > 0, got {target!r}")
        if not (horizon > 0) or not math.isfinite(horizon):
            raise ValueError(f"horizon must be a finite number > 0, got {horizon!r}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Update the coefficient after ``n_steps`` samples at measured KL; returns the new value."""
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
        return self.value


def entropy_from_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean per-token entropy over valid tokens.

        H_t = logsumexp(l_t) - sum_v softmax(l_t)_v * l_{t,v},     result = mean_mask(H_t)

    Args:
        logits: (B, T, V).
        mask: (B, T).
    """
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(mask.shape):
        raise ValueError(
            f"logits must have shape (B, T, V) matching mask (B, T); got {tuple(logits.shape)} "
            f"and {tuple(mask.shape)}"
        )
    probs = torch.softmax(logits, dim=-1)
    ent = torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)
    return masked_mean(ent, mask)
