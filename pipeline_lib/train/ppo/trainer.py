"""The PPO training loop (see the package docstring)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline_lib.math.kl import kl_k1, kl_k3
from pipeline_lib.math.losses import bond_loss
from pipeline_lib.math.ppo_math import (
    gae_advantages,
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
    scheduled_lr,
    token_rewards,
    whiten,
)
from pipeline_lib.models.encoding import decode_responses, eos_token_ids
from pipeline_lib.train.distributed import (
    is_zero3,
    rank_slice,
    reduce_sums,
    whiten_moments,
)
from pipeline_lib.train.ppo.config import MAX_GRAD_NORM, PPOConfig, RewardFn
from pipeline_lib.train.ppo.rollout import (
    at_response,
    generate_responses,
    make_batch,
    score_rollout,
    sft_token_nll,
    token_logprobs,
)
from pipeline_lib.train.ppo.run import PPORun, final_policy, save_ppo_checkpoint, start_run

log = logging.getLogger(__name__)


def train_ppo(
    policy,
    tokenizer,
    prompts: list[str],
    reward_fn: RewardFn,
    cfg: PPOConfig,
    seed: int,
    checkpoint_dir: str | Path | None = None,
    sft_examples: list[tuple[list[int], list[int]]] | None = None,
    on_log: Callable[[dict], None] | None = None,
) -> tuple[list[dict], Any]:
    """Train ``policy`` with PPO against ``reward_fn`` and a frozen copy of itself.

    Args:
        policy: HF causal LM (e.g. loaded from the SFT directory); trained in place.
        tokenizer: its tokenizer (pad token falls back to EOS).
        prompts: prompt texts, encoded with :func:`~pipeline_lib.models.encoding.encode_prompt`.
        reward_fn: ``(prompt_indices (B,), response_texts, response_ids) -> (B,) float64``
            sequence rewards (the proxy reward for ``ppo``, log F̂ for ``vbon``).
        cfg: hyper-parameters; ``cfg.steps`` counts all steps including resumed ones.
        seed: seeds prompt order, minibatch order and sampling.
        checkpoint_dir: where ``last/`` is saved and, when present, resumed from.
        sft_examples: BOND forward-KL examples (prompt ids, response ids); used when
            ``cfg.sft_weight > 0``.
        on_log: called with each *new* log row (not with rows restored from a checkpoint).

    Returns:
        (log rows, the trained policy as a plain HF causal LM in eval mode).
    """
    pad_id, eos_id = _check_inputs(prompts, tokenizer, cfg, sft_examples, policy)
    run = start_run(policy, tokenizer, prompts, cfg, seed, checkpoint_dir, sft_examples, pad_id,
                 eos_id)
    st = run.state
    total = int(cfg.steps)
    bar = tqdm(total=total, initial=min(st.step, total), desc="ppo", unit="step",
               mininterval=5.0, disable=not run.acc.is_main_process)
    saved_at = st.step
    while st.step < total:
        rollout = collect_rollout(run, reward_fn)
        adv, returns = rollout_advantages(run, rollout)
        stats = ppo_update(run, rollout, adv, returns)
        log_step(run, rollout, stats, on_log)
        bar.update(1)
        if cfg.checkpoint_every and st.step % int(cfg.checkpoint_every) == 0 and st.step < total:
            save_ppo_checkpoint(run)
            saved_at = st.step
    bar.close()
    if run.ckpt_root is not None and (saved_at != st.step or run.resumed_from is None):
        save_ppo_checkpoint(run)
    return st.rows, final_policy(run)


def _check_inputs(prompts, tokenizer, cfg: PPOConfig, sft_examples,
                  policy) -> tuple[int, list[int]]:
    """(pad id, EOS ids) after checking the prompts, the BOND examples and the tokenizer; the
    EOS ids are the tokenizer's and the policy's generation config's."""
    if not prompts:
        raise ValueError("train_ppo needs at least one prompt")
    use_sft = cfg.sft_weight > 0
    if use_sft and not sft_examples:
        raise ValueError("sft_weight > 0 needs sft_examples")
    if sft_examples and not use_sft:
        log.info("sft_examples given but sft_weight = 0: the SFT term is not used")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer needs a pad or eos token")
    return pad_id, eos_token_ids(tokenizer, policy)


@dataclass
class Rollout:
    """One step's rollout on this rank: the batch, its sequence rewards, and its log-probs,
    values and reference log-probs at the response tokens."""

    batch: Any
    scores: np.ndarray
    old_logp: torch.Tensor
    old_values: torch.Tensor
    ref_logp: torch.Tensor
    ent_sum: float
    beta: float


def collect_rollout(run: PPORun, reward_fn: RewardFn) -> Rollout:
    """Rollout and scoring: every rank draws the same prompt indices and keeps its share,
    samples one response per prompt, scores it, and computes the old log-probs and values
    and the reference log-probs."""
    cfg, st = run.cfg, run.state
    b_size = int(cfg.rollout_batch_size)
    b_local = b_size // run.world
    idx = st.prompt_cycler.take(b_size, st.rng)[rank_slice(b_size, run.rank, run.world)]
    batch_prompts = [run.prompt_ids[i] for i in idx]
    unwrapped = run.acc.unwrap_model(run.model)
    responses = generate_responses(unwrapped.policy, batch_prompts, run.gen_cfg, run.pad_id,
                                   run.eos_id, run.acc.device, synced=is_zero3(run.acc))
    texts = decode_responses(run.tokenizer, responses, run.eos_id)
    scores = np.asarray(reward_fn(idx.copy(), list(texts), [list(r) for r in responses]),
                        dtype=np.float64)
    if scores.shape != (b_local,) or not np.all(np.isfinite(scores)):
        raise ValueError(
            f"reward_fn must return {b_local} finite rewards, got shape {scores.shape}"
            + ("" if scores.shape != (b_local,) else " with non-finite values"))
    batch = make_batch(batch_prompts, responses, run.pad_id).to(run.acc.device)
    old_logp, old_values, ref_logp, ent_sum = score_rollout(
        run.model, run.ref, batch, cfg, int(cfg.minibatch_size) // run.world,
        run.acc)
    return Rollout(batch, scores, old_logp, old_values, ref_logp, ent_sum, st.kl_ctl.value)


def rollout_advantages(run: PPORun, r: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rewards with the KL penalty at this step's beta, GAE advantages and returns, and
    the advantages whitened over every rank's tokens (``whiten_advantages``)."""
    cfg, mask = run.cfg, r.batch.mask
    seq_reward = torch.as_tensor(r.scores, dtype=torch.float32, device=run.acc.device)
    rewards = token_rewards(seq_reward, r.old_logp, r.ref_logp, mask, r.beta, cfg.reward_clip)
    adv, returns = gae_advantages(rewards, r.old_values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        if run.world == 1:
            if float(mask.sum()) > 1:
                adv = whiten(adv, mask)
        else:
            am = adv * mask
            s_x, s_x2, n_tok = reduce_sums(run.acc, [am.sum(), (am * adv).sum(), mask.sum()])
            if n_tok > 1:
                adv = whiten(adv, mask, moments=whiten_moments(s_x, s_x2, n_tok))
    return adv, returns


UPDATE_STATS = ("loss", "policy_loss", "value_loss", "clipfrac", "value_clipfrac", "approx_kl",
                "grad_norm", "sft_nll")


def ppo_update(run: PPORun, r: Rollout, adv: torch.Tensor,
               returns: torch.Tensor) -> dict[str, list[float]]:
    """``ppo_epochs`` passes over shuffled minibatches of this rank's rollout; returns the
    per-update statistics."""
    cfg, st = run.cfg, run.state
    mb_local = int(cfg.minibatch_size) // run.world
    b_local = int(cfg.rollout_batch_size) // run.world
    stats: dict[str, list[float]] = {k: [] for k in UPDATE_STATS}
    lr = scheduled_lr(cfg.lr, st.step, int(cfg.steps), cfg.lr_schedule, cfg.lr_final)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    for _ in range(int(cfg.ppo_epochs)):
        perm = st.rng.permutation(b_local)
        for s in range(0, b_local, mb_local):
            rows_idx = torch.as_tensor(perm[s : s + mb_local], dtype=torch.long,
                                       device=run.acc.device)
            _minibatch_step(run, r, adv, returns, rows_idx, stats)
    return stats


def _minibatch_step(run: PPORun, r: Rollout, adv, returns, rows_idx, stats) -> None:
    """One optimiser step on a minibatch: clipped policy and value losses, plus BOND's SFT term
    on best-of-n examples when ``sft_weight > 0`` (the NLL per target token, on the token-mean
    scale of the PPO loss)."""
    cfg, acc = run.cfg, run.acc
    sub = r.batch.rows(rows_idx)
    t_len = sub.mask.shape[1]
    logits, values = run.model(sub.input_ids, sub.attention_mask)
    logp = token_logprobs(at_response(logits, sub.pos).float(), sub.resp_ids, cfg)
    values = at_response(values, sub.pos)
    pl, clipfrac, approx_kl = ppo_policy_loss(
        logp, r.old_logp[rows_idx, :t_len], adv[rows_idx, :t_len], sub.mask, cfg.clip)
    vl, vclipfrac = ppo_value_loss(
        values, r.old_values[rows_idx, :t_len], returns[rows_idx, :t_len], sub.mask,
        cfg.value_clip)
    loss = pl + cfg.vf_coef * vl
    if cfg.sft_weight > 0:
        mb = int(cfg.minibatch_size)
        take = run.state.sft_cycler.take(mb, run.state.rng)[rank_slice(mb, run.rank, run.world)]
        ex = [run.sft_examples[i] for i in take]
        sft_batch = make_batch([p for p, _ in ex], [y for _, y in ex], run.pad_id)
        nll = sft_token_nll(run.model, sft_batch.to(acc.device), cfg)
        loss = bond_loss(nll, loss, 1.0 - cfg.sft_weight)
        stats["sft_nll"].append(float(nll.detach()))
    acc.backward(loss)
    grad_norm = acc.clip_grad_norm_(run.params, MAX_GRAD_NORM)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    for key, value in (("loss", loss), ("policy_loss", pl), ("value_loss", vl)):
        stats[key].append(float(value.detach()))
    stats["clipfrac"].append(float(clipfrac))
    stats["value_clipfrac"].append(float(vclipfrac))
    stats["approx_kl"].append(float(approx_kl))
    stats["grad_norm"].append(float(grad_norm) if grad_norm is not None else 0.0)


def log_step(run: PPORun, r: Rollout, stats: Mapping[str, list[float]],
             on_log: Callable[[dict], None] | None) -> None:
    """KL and entropy of the rollout (reduced over ranks), the KL controller's update, the
    step count, and a log row every ``log_every`` steps (and at the last)."""
    cfg, st = run.cfg, run.state
    b_size = int(cfg.rollout_batch_size)
    kl_seq, kl3, n_tok, ent_total, score_mean = _rollout_kl(run, r)
    st.kl_ctl.update(kl_seq, b_size)
    st.step += 1
    if not (st.step % int(cfg.log_every) == 0 or st.step == int(cfg.steps)):
        return
    means = {k: float(np.mean(v)) for k, v in stats.items() if v}
    if run.world > 1:  # per-update statistics: the mean over ranks
        keys = sorted(means)
        means = dict(zip(keys, (v / run.world for v in reduce_sums(
            run.acc, [means[k] for k in keys])), strict=True))
    row = dict(
        step=st.step, loss=means["loss"], policy_loss=means["policy_loss"],
        value_loss=means["value_loss"], reward=score_mean, score=score_mean, kl_k1=kl_seq,
        kl_k3=kl3, entropy=ent_total / n_tok, kl_coef=float(r.beta),
        lr=float(run.optimizer.param_groups[0]["lr"]), clipfrac=means["clipfrac"],
        value_clipfrac=means["value_clipfrac"], approx_kl=means["approx_kl"],
        grad_norm=means["grad_norm"], sft_nll=means.get("sft_nll"),
        response_length=n_tok / b_size, prompts_seen=st.step * b_size,
        elapsed_s=st.elapsed(),
    )
    st.rows.append(row)
    if on_log is not None and run.acc.is_main_process:
        on_log(row)


@torch.no_grad()
def _rollout_kl(run: PPORun, r: Rollout) -> tuple[float, float, float, float, float]:
    """(mean per-sequence k1, mean per-token k3, tokens, summed entropy, mean score) of the
    rollout over every rank."""
    mask, b_size = r.batch.mask, int(run.cfg.rollout_batch_size)
    kl_tok = kl_k1(r.old_logp, r.ref_logp) * mask
    k3_tok = torch.where(mask.bool(), kl_k3(r.old_logp, r.ref_logp), torch.zeros_like(mask))
    if run.world == 1:
        kl_seq = float(kl_tok.sum(dim=1).mean())
        kl3 = float(masked_mean(kl_k3(r.old_logp, r.ref_logp), mask))
        return kl_seq, kl3, float(mask.sum()), r.ent_sum, float(r.scores.mean())
    local = [kl_tok.sum(), k3_tok.sum(), mask.sum(), r.ent_sum, float(r.scores.sum())]
    kl_total, k3_total, n_tok, ent_total, score_total = reduce_sums(run.acc, local)
    return kl_total / b_size, k3_total / n_tok, n_tok, ent_total, score_total / b_size


