"""Log-probabilities under the *sampling distribution* of a causal LM: the next-token
distribution that ``generate`` actually samples from with (temperature, top_p, top_k).

This is the one definition of π and π_ref used everywhere a log-prob is taken (the reference
log-probs of the cache, evaluation, the PPO trainer, the preference trainer); see
docs/METHODS.md, "Notation". The warping is that of ``transformers``' sampling
(``TemperatureLogitsWarper``, then ``TopKLogitsWarper``, then ``TopPLogitsWarper``, with
``min_tokens_to_keep = 1``), reproduced operation by operation so that on the same logits it keeps
exactly the same tokens:

* temperature: ``logits / T``;
* top-k (``k > 0``): a token is removed when its logit is *strictly* below the k-th largest
  (ties with the k-th are kept, so more than k tokens may survive);
* top-p (``p < 1``): sort ascending, softmax, cumulative sum; a token is removed when the
  cumulative mass up to and including it is ``<= 1 - p``; the most probable token always stays.

A removed token has log-probability ``-inf`` (probability 0). For a KL(π ‖ π_ref) this means:
a sample of π outside π_ref's truncated support makes the KL infinite (k1 = +inf, k3 = +inf, no
NaN while log π is finite). A token scored under the distribution that sampled it is in its
support, but the scoring forward pass (all positions at once) can differ from the cached
generation pass by round-off and move a token sitting exactly on the top-k / top-p boundary out:
``keep_tokens=True`` keeps the scored tokens in the support (a no-op for every token inside it),
so the log-probs of a distribution's own samples are always finite.

With ``temperature = 1, top_p = 1, top_k = 0`` the result is exactly (bitwise)
``log_softmax(logits).gather(tokens)``.
"""

from __future__ import annotations

import math

import torch


def check_sampling(temperature: float, top_p: float, top_k: int) -> None:
    """ValueError unless temperature > 0, 0 < top_p <= 1 and top_k >= 0 (0 = no top-k)."""
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p!r}")
    if int(top_k) != top_k or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")


def truncates(top_p: float, top_k: int) -> bool:
    """Whether (top_p, top_k) removes tokens from the support (top_p < 1 or top_k > 0)."""
    return top_p < 1.0 or int(top_k) > 0


def sampling_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """The warped logits (..., V) of the sampling distribution: ``logits / temperature`` with
    ``-inf`` at the tokens top-k and top-p remove (module docstring). ``keep`` (..., integer
    token ids, the shape of ``logits`` without its last axis) names one token per row that is
    never removed. Their softmax is the sampling distribution. At the defaults ``logits`` itself
    is returned."""
    check_sampling(temperature, top_p, top_k)
    scores = logits if temperature == 1.0 else logits / temperature
    if not truncates(top_p, top_k):
        return scores
    remove = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if top_k > 0:  # TopKLogitsWarper
        k = min(int(top_k), scores.shape[-1])
        remove = scores < torch.topk(scores, k)[0][..., -1, None]
        scores = scores.masked_fill(remove, -float("inf"))
    if top_p < 1.0:  # TopPLogitsWarper (on the top-k filtered scores)
        sorted_logits, sorted_indices = torch.sort(scores, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        sorted_remove = cumulative <= (1 - top_p)
        sorted_remove[..., -1:] = False
        remove = remove | sorted_remove.scatter(-1, sorted_indices, sorted_remove)
    if keep is not None:
        remove = remove.scatter(-1, keep.unsqueeze(-1).to(remove.device), False)
    base = logits if temperature == 1.0 else logits / temperature
    return base.masked_fill(remove, -float("inf"))


def sampling_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    keep_tokens: bool = False,
) -> torch.Tensor:
    """log p(token) under the sampling distribution of ``logits`` (..., V) at ``tokens`` (...):
    ``log_softmax(sampling_logits(...)).gather(tokens)``; ``-inf`` for a token outside the
    truncated support unless ``keep_tokens`` (module docstring). Differentiable in ``logits``.
    At ``temperature = 1, top_p = 1, top_k = 0`` bitwise equal to
    ``torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]``."""
    warped = sampling_logits(logits, temperature, top_p, top_k,
                             keep=tokens if keep_tokens else None)
    return torch.log_softmax(warped, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
