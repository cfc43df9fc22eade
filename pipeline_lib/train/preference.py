"""Offline preference training on best/worst-of-n pairs: DPO, IPO, BoNBoN and BoN-SFT.

One trainer serves the four methods of ``METHODS.md`` ("Preference losses"). Pairs come from the
reference cache (:func:`bon_pairs`), which also carries the *reference* log-probabilities
``log pi_ref(y|x)`` of every response (summed over the response tokens, EOS included, given
``encode_prompt(prompt)``, at temperature 1), so no reference model is held in memory: the
policy log-ratio is ``h(y) = log pi_theta(y|x) - ref_logprob(y)``.

Policy log-probabilities are computed on exactly the cached token ids (never re-tokenised text),
with the same convention as :func:`pipeline_lib.generation.hf.sequence_logprobs`: right-padded
``encode_prompt(prompt) + response_ids`` so positions are ``0..L-1``. Chosen and rejected
sequences go through the policy in one forward pass per step (chosen rows first).

Losses (per example, then the batch mean):

* ``dpo``     -- :func:`~pipeline_lib.math.losses.dpo_loss` with ``beta`` and ``label_smoothing``;
* ``ipo``     -- :func:`~pipeline_lib.math.losses.ipo_loss` with ``beta`` (target margin 1/(2 beta));
* ``bonbon``  -- :func:`~pipeline_lib.math.losses.bonbon_loss` with ``n``, ``alpha`` and
  ``bonbon_variant`` (``"ipo"``: the paper; ``"dpo_sigmoid"``: the public trainer as shipped),
  beta* = ``bonbon_beta(n)`` unless ``beta_override`` is set; the SFT term is the summed NLL of
  the best response, ``-log pi_theta(y_best|x)``;
* ``bon_sft`` -- :func:`~pipeline_lib.math.losses.sft_loss` on the best response only: the batch mean
  of the per-example *summed* (not length-averaged) NLL. The rejected response still goes
  through the same forward pass (without contributing to the loss) so that the logged margin
  and accuracy are comparable across methods.

Dropout is disabled by default (``disable_dropout``: the policy runs in ``eval()`` mode while
its parameters are trained), as in common DPO trainers, so that ``h = 0`` exactly at step 0
when the policy is the reference and the log-ratios are not dropout noise.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pipeline_lib.generation.sampling import pad_batch
from pipeline_lib.math.losses import (
    BONBON_VARIANTS,
    bonbon_beta,
    bonbon_loss,
    dpo_loss,
    ipo_loss,
    sft_loss,
)
from pipeline_lib.models.encoding import encode_prompt
from pipeline_lib.settings.methods import PREFERENCE_METHODS
from pipeline_lib.train.checkpoints import (
    load_trainer_state,
    load_weights_dir,
    read_trainer_checkpoint,
    save_trainer_checkpoint,
)
from pipeline_lib.train.distributed import (
    configure_deepspeed,
    global_mean_scale,
    local_part,
    reduce_sums,
    unsharded_model,
)
from pipeline_lib.train.pairs import require_columns
from pipeline_lib.train.runtime import empty_model, make_accelerator, warmup_scheduler

log = logging.getLogger(__name__)


@dataclass
class PreferenceConfig:
    """Settings of :func:`train_preference`.

    ``beta`` is the DPO/IPO coefficient; BoNBoN uses beta* = ``bonbon_beta(n)`` unless
    ``beta_override`` is set. ``n`` is the BoN size the pairs were built with (BoNBoN only; if
    the pairs carry an ``n`` column it must agree). ``max_grad_norm`` clips the global gradient
    norm (``None`` or 0 disables clipping).
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

    def __post_init__(self) -> None:
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


# Settings that must not change when a run resumes from a checkpoint (the others -- epochs,
# max_steps, checkpoint_every, log_every, device, mixed_precision -- may).
_RESUME_INVARIANT = ("method", "beta", "n", "alpha", "label_smoothing", "bonbon_variant",
                     "beta_override", "batch_size", "lr", "weight_decay", "warmup_steps",
                     "max_grad_norm", "disable_dropout")


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
) -> torch.Tensor:
    """Σ_t log π(y_t | x, y_<t) over each response in one right-padded forward pass.

    Differentiable (the caller decides about ``no_grad``); float32 of shape (B,). Same
    convention as :func:`pipeline_lib.generation.hf.sequence_logprobs`, which is its no-grad,
    float64 twin used to fill the reference cache.
    """
    if any(len(p) < 1 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token (BOS) to condition on")
    ids, attn, labels = _sequence_batch(prompt_ids, response_ids, pad_id)
    ids, attn, labels = ids.to(device), attn.to(device), labels.to(device)
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100,
        reduction="none",
    ).view(target.shape)
    return -nll.sum(-1)


def _max_positions(model) -> int | None:
    config = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@dataclass
class _EncodedPairs:
    prompt_ids: list[list[int]]
    chosen_ids: list[list[int]]
    rejected_ids: list[list[int]]
    ref_chosen: np.ndarray
    ref_rejected: np.ndarray


def _encode_pairs(pairs: pl.DataFrame, tokenizer, max_positions: int | None) -> _EncodedPairs:
    need = ("prompt", "best_token_ids", "worst_token_ids", "best_ref_logprob",
            "worst_ref_logprob")
    require_columns(pairs, need, "pairs")
    if pairs.height == 0:
        raise ValueError("pairs is empty: nothing to train on")
    ids_of = (pairs["prompt_id"].to_list() if "prompt_id" in pairs.columns
              else [str(i) for i in range(pairs.height)])
    prompts = pairs["prompt"].to_list()
    cache: dict[str, list[int]] = {}
    prompt_ids = []
    for text in prompts:
        if text not in cache:
            cache[text] = encode_prompt(tokenizer, text)
        prompt_ids.append(cache[text])
    chosen = [list(map(int, r)) for r in pairs["best_token_ids"].to_list()]
    rejected = [list(map(int, r)) for r in pairs["worst_token_ids"].to_list()]
    ref_c = np.array(pairs["best_ref_logprob"].cast(pl.Float64).to_numpy(), dtype=np.float64)
    ref_r = np.array(pairs["worst_ref_logprob"].cast(pl.Float64).to_numpy(), dtype=np.float64)
    for i, pid in enumerate(ids_of):
        for what, resp in (("best", chosen[i]), ("worst", rejected[i])):
            if not resp:
                raise ValueError(f"pair for prompt {pid!r} has an empty {what} response")
            if max_positions is not None and len(prompt_ids[i]) + len(resp) > max_positions:
                raise ValueError(
                    f"pair for prompt {pid!r}: prompt + {what} response is "
                    f"{len(prompt_ids[i]) + len(resp)} tokens, longer than the policy's "
                    f"{max_positions} positions (log-probs would not match the cache)"
                )
        if not (np.isfinite(ref_c[i]) and np.isfinite(ref_r[i])):
            raise ValueError(f"pair for prompt {pid!r} has a non-finite reference log-prob")
    return _EncodedPairs(prompt_ids, chosen, rejected, ref_c, ref_r)


def train_preference(
    policy,
    tokenizer,
    pairs: pl.DataFrame,
    cfg: PreferenceConfig,
    seed: int,
    checkpoint_dir: str | os.PathLike | None = None,
    on_log: Callable[[dict], None] | None = None,
) -> tuple[list[dict], Any]:
    """Train ``policy`` offline on preference pairs with ``cfg.method``.

    Args:
        policy: a causal LM whose current weights are the reference the cached
            ``*_ref_logprob`` columns were computed with (or a checkpoint of a run on them).
        tokenizer: its tokenizer (prompts are encoded with ``encode_prompt``).
        pairs: a :func:`bon_pairs` frame (needs prompt, best/worst_token_ids and
            best/worst_ref_logprob; prompt_id and n are used when present).
        cfg: the :class:`PreferenceConfig`.
        seed: fixes the data order (epoch e is ``default_rng([seed, e]).permutation``) and the
            torch RNG (dropout, when enabled).
        checkpoint_dir: if given, ``checkpoint_dir/last`` is written every
            ``cfg.checkpoint_every`` steps and at the end, and a run resumes from it (continuing
            at step k + 1 with the saved weights, optimizer, scheduler and RNG states and log
            rows). A resumed run must keep the loss/optimiser settings; ``max_steps`` / ``epochs``
            may grow (the linear LR schedule is then re-based on the new total).
        on_log: called with each new log row (on the main process).

    Returns:
        (all log rows including those restored from a checkpoint, the trained model unwrapped
        from accelerate; None on the non-main ranks under ZeRO-3).

    **Several processes** (``accelerate launch``): ``batch_size`` is the *global* batch; each
    rank takes a contiguous slice of it (:func:`pipeline_lib.train.distributed.rank_slice`) and its
    loss is ``sum(local losses) * world / batch``, so the averaged gradient is the gradient of
    the global batch mean, as in one process. Logged statistics are reduced over ranks.

    Each row (every ``log_every`` steps and the last) describes the batch of that step *before*
    its update: step, split ("train"), epoch (fractional), loss, lr (after the step), tokens
    (non-pad tokens forwarded so far), pairs (pairs seen so far), reward_margin = mean(h_w - h_l)
    (the unscaled implicit-reward margin; multiply by beta for DPO's implicit reward),
    accuracy = mean(h_w > h_l), chosen_logp / rejected_logp (mean summed policy log-probs),
    kl_best_k1 = mean(log pi(y_best) - log pi_ref(y_best)) -- the log-ratio on the *chosen cached
    reference samples*, NOT an estimate of KL(pi || pi_ref) (that needs samples from pi; it can be
    negative), grad_norm (before clipping) and elapsed_s (including time before a resume).
    """
    if cfg.method == "bonbon" and "n" in pairs.columns:
        ns = set(pairs["n"].unique().to_list())
        if ns != {cfg.n}:
            raise ValueError(f"pairs were built with n = {sorted(ns)} but cfg.n = {cfg.n}")
    data = _encode_pairs(pairs, tokenizer, _max_positions(policy))
    n_pairs = len(data.prompt_ids)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        tokenizer.eos_token_id
    bs = int(cfg.batch_size)
    steps_per_epoch = math.ceil(n_pairs / bs)
    total = steps_per_epoch * int(cfg.epochs)
    if cfg.max_steps:
        total = min(total, int(cfg.max_steps))

    acc = make_accelerator({"device": cfg.device, "mixed_precision": cfg.mixed_precision})
    world, rank = acc.num_processes, acc.process_index
    cfg_dict = dataclasses.asdict(cfg)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    invariants = {k: cfg_dict[k] for k in _RESUME_INVARIANT}
    expected = dict(invariants=invariants, seed=seed, n_pairs=n_pairs, processes=world)
    resume, state, rows = read_trainer_checkpoint(ckpt_dir, expected)
    if resume is not None:
        load_weights_dir(policy, resume)
        log.info("resuming %s from %s at step %d", cfg.method, resume, state["step"] + 1)
    else:
        torch.manual_seed(seed + rank)

    model_config = policy.config
    optimizer = torch.optim.AdamW(policy.parameters(), lr=float(cfg.lr),
                                  weight_decay=float(cfg.weight_decay))
    scheduler = warmup_scheduler(optimizer, int(cfg.warmup_steps), total)
    configure_deepspeed(acc, math.ceil(bs / world), cfg.max_grad_norm)
    model, optimizer, scheduler = acc.prepare(policy, optimizer, scheduler)
    step, tokens, pairs_seen, elapsed0 = 0, 0, 0, 0.0
    if resume is not None:
        load_trainer_state(acc, optimizer, scheduler, resume)
        step, tokens, pairs_seen = int(state["step"]), int(state["tokens"]), int(state["pairs"])
        elapsed0 = float(state["elapsed_s"])
    if cfg.disable_dropout:
        model.eval()
    else:
        model.train()

    t0 = time.perf_counter() - elapsed0
    beta_used = effective_beta(cfg)

    def checkpoint() -> None:
        if ckpt_dir is None:
            return
        meta = dict(expected, step=step, tokens=tokens, pairs=pairs_seen, total=total,
                    config=cfg_dict, beta=beta_used, elapsed_s=time.perf_counter() - t0)
        save_trainer_checkpoint(acc, ckpt_dir, model, optimizer, scheduler, meta, rows, tokenizer)

    def final_model():
        return unsharded_model(acc, model, lambda: empty_model(model_config, "causal"))

    if step >= total:
        log.info("checkpoint is at step %d >= %d steps: nothing to train", step, total)
        return rows, final_model()

    bar = tqdm(total=total, initial=step, desc=f"{cfg.method} seed {seed}", unit="step",
               mininterval=5.0, disable=not acc.is_main_process)
    ref_c = torch.as_tensor(data.ref_chosen, dtype=torch.float64)
    ref_r = torch.as_tensor(data.ref_rejected, dtype=torch.float64)
    while step < total:
        epoch, pos = divmod(step, steps_per_epoch)
        order = np.random.default_rng([int(seed), epoch]).permutation(n_pairs)
        idx = order[pos * bs : (pos + 1) * bs]
        b = len(idx)
        local, weight = local_part(idx, rank, world)  # weight 0: a rank left without pairs
        nb = len(local)
        prompts = [data.prompt_ids[i] for i in local]
        responses = [data.chosen_ids[i] for i in local] + [data.rejected_ids[i] for i in local]
        logps = policy_logprobs(model, prompts + prompts, responses, pad_id, acc.device)
        logps = logps.double()
        pc, pr = logps[:nb], logps[nb:]
        rc, rr = ref_c[local].to(logps.device), ref_r[local].to(logps.device)
        per_pair = preference_loss(cfg, pc, pr, rc, rr) * weight
        if world == 1:  # the same arithmetic as before multi-process support
            loss = per_pair.mean()
        else:
            loss = per_pair.sum() * global_mean_scale(b, world)
        acc.backward(loss)
        grad_norm = None
        if cfg.max_grad_norm:
            grad_norm = acc.clip_grad_norm_(model.parameters(), float(cfg.max_grad_norm))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        step += 1
        tokens += sum(2 * len(data.prompt_ids[i]) + len(data.chosen_ids[i])
                      + len(data.rejected_ids[i]) for i in idx)
        pairs_seen += b
        bar.update(1)
        if step % int(cfg.log_every) == 0 or step == total:
            with torch.no_grad():
                hw, hl = (pc - rc).detach() * weight, (pr - rr).detach() * weight
                sums = reduce_sums(acc, [
                    per_pair.sum(), (hw - hl).sum(), ((hw > hl).double() * weight).sum(),
                    pc.detach().sum() * weight, pr.detach().sum() * weight, hw.sum()])
            loss_s, margin_s, right_s, pc_s, pr_s, hw_s = (v / b for v in sums)
            row = dict(
                step=step, split="train", epoch=step / steps_per_epoch, loss=loss_s,
                lr=scheduler.get_last_lr()[0], tokens=tokens, pairs=pairs_seen,
                reward_margin=margin_s, accuracy=right_s, chosen_logp=pc_s,
                rejected_logp=pr_s, kl_best_k1=hw_s,
                grad_norm=None if grad_norm is None else float(grad_norm),
                elapsed_s=time.perf_counter() - t0,
            )
            rows.append(row)
            if on_log and acc.is_main_process:
                on_log(row)
        if step % int(cfg.checkpoint_every) == 0 and step < total:
            checkpoint()
    bar.close()
    checkpoint()
    return rows, final_model()
