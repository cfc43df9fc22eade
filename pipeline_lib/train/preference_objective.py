"""The preference methods' config, their β and loss, and the policy log-probs they compare
(see :mod:`pipeline_lib.train.preference` for the trainer and the methods)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline_lib.generation.sampling import pad_batch
from pipeline_lib.math.logprobs import check_sampling, sampling_logprobs, truncates
from pipeline_lib.math.losses import (
    BONBON_VARIANTS,
    bonbon_beta,
    bonbon_loss,
    dpo_loss,
    ipo_loss,
    sft_loss,
)
from pipeline_lib.settings.methods import PREFERENCE_METHODS


@dataclass
class PreferenceConfig:
    """Settings of :func:`train_preference`.

    ``beta`` is the DPO/IPO coefficient; BoNBoN uses beta* = ``bonbon_beta(n)`` unless
    ``beta_override`` is set. ``n`` is the BoN size the pairs were built with (BoNBoN only; if
    the pairs carry an ``n`` column it must agree). ``max_grad_norm`` clips the global gradient
    norm (``None`` or 0 disables clipping). ``temperature``, ``top_p`` and ``top_k`` are those
    of ``generation``: the policy's log-probs are taken under the sampling distribution, as the
    cached reference log-probs of the pairs are; truncation (``top_p < 1`` or ``top_k > 0``) is
    refused (once the policy's own support moves, log π of a cached response is -inf).
    """

    method: str  # dpo | ipo | bonbon | bon_sft
    beta: float = 0.1
    n: int = 8
    alpha: float = 0.005
    label_smoothing: float = 0.0
    bonbon_variant: str = "ipo"  # or "dpo_sigmoid" (the public BoNBoN trainer as shipped)
    beta_override: float | None = None
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 16
    lr: float = 5e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    disable_dropout: bool = True
    checkpoint_every: int = 50
    log_every: int = 1
    mixed_precision: str = "no"
    device: str = "auto"
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        check_sampling(self.temperature, self.top_p, self.top_k)
        if truncates(self.top_p, self.top_k):
            raise ValueError(
                f"top_p = {self.top_p} / top_k = {self.top_k} truncate the sampling "
                "distribution: a cached response outside the policy's truncated support has "
                "log pi = -inf and the loss is undefined; preference training needs top_p = 1 "
                "and top_k = 0 (any temperature is fine)")
        if self.method not in PREFERENCE_METHODS:
            raise ValueError(f"method must be one of {PREFERENCE_METHODS}, got {self.method!r}")
        if self.bonbon_variant not in BONBON_VARIANTS:
            raise ValueError(
                f"bonbon_variant must be one of {BONBON_VARIANTS}, got {self.bonbon_variant!r}"
            )
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise ValueError(f"beta must be a finite number > 0, got {self.beta!r}")
        if self.beta_override is not None and not (
            self.beta_override > 0 and math.isfinite(self.beta_override)
        ):
            raise ValueError(f"beta_override must be > 0 or None, got {self.beta_override!r}")
        if self.method == "bonbon":
            bonbon_beta(self.n)  # validates n >= 2
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {self.alpha!r}")
        if not 0.0 <= self.label_smoothing <= 0.5:
            raise ValueError(f"label_smoothing must lie in [0, 0.5], got {self.label_smoothing!r}")
        for name in ("epochs", "batch_size", "checkpoint_every", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.max_steps is not None and int(self.max_steps) < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {self.max_steps!r}")
        if int(self.warmup_steps) < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps!r}")


def effective_beta(cfg: PreferenceConfig) -> float | None:
    """The KL coefficient a run uses: beta (dpo/ipo), beta* or the override (bonbon), None
    (bon_sft)."""
    if cfg.method == "bon_sft":
        return None
    if cfg.method == "bonbon":
        return cfg.beta_override if cfg.beta_override is not None else bonbon_beta(cfg.n)
    return cfg.beta


def preference_loss(
    cfg: PreferenceConfig,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
) -> torch.Tensor:
    """Per-example loss (shape (B,)) of ``cfg.method`` from summed sequence log-probs."""
    args = (policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
            reference_rejected_logps)
    if cfg.method == "dpo":
        return dpo_loss(*args, beta=cfg.beta, label_smoothing=cfg.label_smoothing)
    if cfg.method == "ipo":
        return ipo_loss(*args, beta=cfg.beta)
    if cfg.method == "bonbon":
        nll = -policy_chosen_logps
        if cfg.beta_override is None:
            return bonbon_loss(*args, n=cfg.n, alpha=cfg.alpha, chosen_nll=nll,
                               variant=cfg.bonbon_variant)
        # Same formula as bonbon_loss with beta* replaced by the override.
        if cfg.bonbon_variant == "ipo":
            pair = ipo_loss(*args, beta=cfg.beta_override)
        else:
            pair = dpo_loss(*args, beta=cfg.beta_override)
        return cfg.alpha * nll + (1.0 - cfg.alpha) * pair
    if cfg.method == "bon_sft":
        return sft_loss(policy_chosen_logps)
    raise ValueError(f"unknown method {cfg.method!r}")


def _sequence_batch(
    prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and labels (-100 outside the response tokens)."""
    full = [[*p, *r] for p, r in zip(prompt_ids, response_ids, strict=True)]
    ids, attn = pad_batch(full, pad_id)
    labels = torch.full_like(ids, -100)
    for i, (p, f) in enumerate(zip(prompt_ids, full, strict=True)):
        labels[i, len(p) : len(f)] = ids[i, len(p) : len(f)]
    return ids, attn, labels


def policy_logprobs(
    model,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    pad_id: int,
    device: torch.device | str = "cpu",
    temperature: float = 1.0,
) -> torch.Tensor:
    """Σ_t log π(y_t | x, y_<t) over each response in one right-padded forward pass, under
    the sampling distribution at ``temperature`` (logits / T; no truncation).

    Differentiable (the caller decides about ``no_grad``); float32 of shape (B,). Same
    convention as :func:`pipeline_lib.generation.hf.sequence_logprobs`, which is its no-grad,
    float64 twin used to fill the reference cache (with the same sampling parameters).
    """
    if any(len(p) < 1 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token (BOS) to condition on")
    ids, attn, labels = _sequence_batch(prompt_ids, response_ids, pad_id)
    ids, attn, labels = ids.to(device), attn.to(device), labels.to(device)
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    if temperature != 1.0:
        tok = sampling_logprobs(logits, target.clamp(min=0), float(temperature))
        return torch.where(target != -100, tok, torch.zeros_like(tok)).sum(-1)
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100,
        reduction="none",
    ).view(target.shape)
    return -nll.sum(-1)
