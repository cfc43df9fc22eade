"""The PPO training loop (see the package docstring)."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline_lib.math.kl import kl_k1, kl_k3
from pipeline_lib.math.losses import bond_loss
from pipeline_lib.math.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    gae_advantages,
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
    token_rewards,
    whiten,
)
from pipeline_lib.math.seeding import derive_seed
from pipeline_lib.models.encoding import encode_prompt
from pipeline_lib.train.checkpoints import (
    load_optimizer,
    load_rng,
    load_weights_dir,
    save_checkpoint,
)
from pipeline_lib.train.distributed import (
    configure_deepspeed,
    full_state_dict,
    is_zero3,
    rank_slice,
    reduce_sums,
    unsharded_model,
    whiten_moments,
)
from pipeline_lib.train.ppo.checkpoint import (
    CHECKPOINT_MARKER,
    Cycler,
    find_ppo_checkpoint,
    write_checkpoint_files,
)
from pipeline_lib.train.ppo.config import MAX_GRAD_NORM, PPOConfig, RewardFn
from pipeline_lib.train.ppo.policy import PolicyWithValueHead, set_trainable_top_layers
from pipeline_lib.train.ppo.rollout import (
    at_response,
    generate_responses,
    generation_config,
    make_batch,
    score_rollout,
    sequence_nll,
    token_logprobs,
)
from pipeline_lib.train.runtime import make_accelerator

log = logging.getLogger(__name__)


# Config fields that may change between a run and its resumption without a warning.
_RESUMABLE_FIELDS = {"steps", "checkpoint_every", "log_every", "device", "mixed_precision"}


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
    eos_id = tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer needs a pad or eos token")

    acc = make_accelerator({"device": cfg.device, "mixed_precision": cfg.mixed_precision})
    world, rank = acc.num_processes, acc.process_index
    for key in ("rollout_batch_size", "minibatch_size"):
        if int(getattr(cfg, key)) % world:
            raise ValueError(f"PPOConfig: {key} ({getattr(cfg, key)}) must be a multiple of the "
                             f"{world} training processes")
    ckpt_root = Path(checkpoint_dir) if checkpoint_dir is not None else None
    resume_from = find_ppo_checkpoint(ckpt_root) if ckpt_root is not None else None

    # Frozen reference: a copy of the policy as given (the SFT model), before any resumed weights.
    ref = copy.deepcopy(policy).to(acc.device).eval()
    for p in ref.parameters():
        p.requires_grad_(False)

    state: dict[str, Any] | None = None
    if resume_from is not None:
        state = json.loads((resume_from / CHECKPOINT_MARKER).read_text())
        if int(state.get("processes", 1)) != world:
            raise ValueError(
                f"cannot resume {resume_from}: written by {state.get('processes', 1)} "
                f"process(es), this run has {world}; use a fresh checkpoint_dir")
        load_weights_dir(policy, resume_from / "policy")
        _warn_config_changes(state, cfg, seed)

    model = PolicyWithValueHead(policy)
    if resume_from is not None:
        from safetensors.torch import load_file

        model.value_head.load_state_dict(load_file(str(resume_from / "value_head.safetensors")))
    set_trainable_top_layers(policy, cfg.trainable_top_layers)
    for p in model.value_head.parameters():
        p.requires_grad_(True)
    model.eval()  # no dropout: the PPO ratio must be 1 at the first update (see module doc)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=float(cfg.lr), weight_decay=float(cfg.weight_decay))
    configure_deepspeed(acc, int(cfg.minibatch_size) // world, MAX_GRAD_NORM)
    model, optimizer = acc.prepare(model, optimizer)
    model.eval()
    if resume_from is not None:
        load_optimizer(acc, optimizer, resume_from)
        load_rng(acc, resume_from)

    if cfg.adaptive_kl:
        kl_ctl: FixedKLController | AdaptiveKLController = AdaptiveKLController(
            cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    else:
        kl_ctl = FixedKLController(cfg.kl_coef)

    rng = np.random.default_rng(seed)
    prompt_cycler = Cycler(len(prompts))
    sft_cycler = Cycler(len(sft_examples) if sft_examples else 0)
    rows: list[dict] = []
    step = 0
    if state is not None:
        step = int(state["step"])
        kl_ctl.value = float(state["kl_coef"])
        rng.bit_generator.state = state["numpy_rng"]
        prompt_cycler = Cycler(len(prompts), state["prompt_cycler"])
        sft_cycler = Cycler(len(sft_examples) if sft_examples else 0, state["sft_cycler"])
        rows = list(state["rows"])
        log.info("resuming PPO from %s at step %d", resume_from, step)
    else:
        # each rank samples its own responses (rank 0 keeps the one-process seed)
        torch.manual_seed(derive_seed(seed, "ppo", "torch", *([rank] if rank else [])))

    prompt_ids = [encode_prompt(tokenizer, t) for t in prompts]
    gen_cfg = generation_config(cfg, tokenizer, pad_id)
    unwrapped = acc.unwrap_model(model)
    total = int(cfg.steps)
    elapsed_before = float(state.get("elapsed_s", 0.0)) if state else 0.0
    t0 = time.perf_counter()

    def trainer_state() -> dict[str, Any]:
        return {
            "step": step,
            "kl_coef": kl_ctl.value,
            "numpy_rng": rng.bit_generator.state,
            "prompt_cycler": prompt_cycler.state(),
            "sft_cycler": sft_cycler.state(),
            "rows": rows,
            "config": dataclasses.asdict(cfg),
            "seed": int(seed),
            "processes": world,
            "elapsed_s": elapsed_before + time.perf_counter() - t0,
        }

    def checkpoint() -> None:
        if ckpt_root is None:
            return
        weights = full_state_dict(acc, model)  # a collective under ZeRO-3
        meta = trainer_state()
        save_checkpoint(acc, ckpt_root, optimizer,
                        lambda tmp: write_checkpoint_files(tmp, unwrapped, weights, meta))

    bar = tqdm(total=total, initial=min(step, total), desc="ppo", unit="step", mininterval=5.0,
               disable=not acc.is_main_process)
    saved_at = step
    mb, b_size = int(cfg.minibatch_size), int(cfg.rollout_batch_size)
    mb_local, b_local = mb // world, b_size // world
    mine = rank_slice(b_size, rank, world)
    synced = is_zero3(acc)
    while step < total:
        # ---------------------------------------------------------------- rollout
        idx = prompt_cycler.take(b_size, rng)[mine]  # every rank draws alike, keeps its share
        batch_prompts = [prompt_ids[i] for i in idx]
        responses = generate_responses(unwrapped.policy, batch_prompts, gen_cfg, pad_id, eos_id,
                              acc.device, synced=synced)
        texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
        scores = np.asarray(reward_fn(idx.copy(), list(texts), [list(r) for r in responses]),
                            dtype=np.float64)
        if scores.shape != (b_local,) or not np.all(np.isfinite(scores)):
            raise ValueError(
                f"reward_fn must return {b_local} finite rewards, got shape {scores.shape}"
                + ("" if scores.shape != (b_local,) else " with non-finite values"))
        batch = make_batch(batch_prompts, responses, pad_id).to(acc.device)
        mask = batch.mask
        old_logp, old_values, ref_logp, ent_sum = score_rollout(
            model, ref, batch, float(cfg.temperature), mb_local, acc)
        beta = kl_ctl.value
        seq_reward = torch.as_tensor(scores, dtype=torch.float32, device=acc.device)
        rewards = token_rewards(seq_reward, old_logp, ref_logp, mask, beta, cfg.reward_clip)
        adv, returns = gae_advantages(rewards, old_values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            if world == 1:
                if float(mask.sum()) > 1:
                    adv = whiten(adv, mask)
            else:
                am = adv * mask
                s_x, s_x2, n_tok = reduce_sums(acc, [am.sum(), (am * adv).sum(), mask.sum()])
                if n_tok > 1:
                    adv = whiten(adv, mask, moments=whiten_moments(s_x, s_x2, n_tok))

        # ---------------------------------------------------------------- optimisation
        stats: dict[str, list[float]] = {k: [] for k in (
            "loss", "policy_loss", "value_loss", "clipfrac", "value_clipfrac", "approx_kl",
            "grad_norm", "sft_nll")}
        for _ in range(int(cfg.ppo_epochs)):
            perm = rng.permutation(b_local)
            for s in range(0, b_local, mb_local):
                rows_idx = torch.as_tensor(perm[s : s + mb_local], dtype=torch.long,
                                           device=acc.device)
                sub = batch.rows(rows_idx)
                t_len = sub.mask.shape[1]
                logits, values = model(sub.input_ids, sub.attention_mask)
                logits = at_response(logits, sub.pos).float() / float(cfg.temperature)
                logp = token_logprobs(logits, sub.resp_ids)
                values = at_response(values, sub.pos)
                pl, clipfrac, approx_kl = ppo_policy_loss(
                    logp, old_logp[rows_idx, :t_len], adv[rows_idx, :t_len], sub.mask, cfg.clip)
                vl, vclipfrac = ppo_value_loss(
                    values, old_values[rows_idx, :t_len], returns[rows_idx, :t_len], sub.mask,
                    cfg.value_clip)
                loss = pl + cfg.vf_coef * vl
                if use_sft:
                    take = sft_cycler.take(mb, rng)[rank_slice(mb, rank, world)]
                    ex = [sft_examples[i] for i in take]
                    sft_batch = make_batch([p for p, _ in ex], [r for _, r in ex], pad_id)
                    nll = sequence_nll(model, sft_batch.to(acc.device)).mean()
                    loss = bond_loss(nll, loss, 1.0 - cfg.sft_weight)
                    stats["sft_nll"].append(float(nll.detach()))
                acc.backward(loss)
                grad_norm = acc.clip_grad_norm_(params, MAX_GRAD_NORM)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                stats["loss"].append(float(loss.detach()))
                stats["policy_loss"].append(float(pl.detach()))
                stats["value_loss"].append(float(vl.detach()))
                stats["clipfrac"].append(float(clipfrac))
                stats["value_clipfrac"].append(float(vclipfrac))
                stats["approx_kl"].append(float(approx_kl))
                stats["grad_norm"].append(float(grad_norm) if grad_norm is not None else 0.0)

        # ---------------------------------------------------------------- bookkeeping
        with torch.no_grad():
            kl_tok = kl_k1(old_logp, ref_logp) * mask
            k3_tok = torch.where(mask.bool(), kl_k3(old_logp, ref_logp), torch.zeros_like(mask))
            local = [kl_tok.sum(), k3_tok.sum(), mask.sum(), ent_sum, float(scores.sum())]
            if world == 1:
                kl_seq = float(kl_tok.sum(dim=1).mean())
                kl3 = float(masked_mean(kl_k3(old_logp, ref_logp), mask))
                n_tok, ent_total, score_mean = float(mask.sum()), ent_sum, float(scores.mean())
            else:
                kl_total, k3_total, n_tok, ent_total, score_total = reduce_sums(acc, local)
                kl_seq, kl3 = kl_total / b_size, k3_total / n_tok
                score_mean = score_total / b_size
        kl_ctl.update(kl_seq, b_size)
        step += 1
        bar.update(1)
        if step % int(cfg.log_every) == 0 or step == total:
            means = {k: float(np.mean(v)) for k, v in stats.items() if v}
            if world > 1:  # per-update statistics: the mean over ranks
                keys = sorted(means)
                means = dict(zip(keys, (v / world for v in reduce_sums(
                    acc, [means[k] for k in keys])), strict=True))
            row = dict(
                step=step,
                loss=means["loss"],
                policy_loss=means["policy_loss"],
                value_loss=means["value_loss"],
                reward=score_mean,
                score=score_mean,
                kl_k1=kl_seq,
                kl_k3=kl3,
                entropy=ent_total / n_tok,
                kl_coef=float(beta),
                lr=float(optimizer.param_groups[0]["lr"]),
                clipfrac=means["clipfrac"],
                value_clipfrac=means["value_clipfrac"],
                approx_kl=means["approx_kl"],
                grad_norm=means["grad_norm"],
                sft_nll=means.get("sft_nll"),
                response_length=n_tok / b_size,
                prompts_seen=step * b_size,
                elapsed_s=elapsed_before + time.perf_counter() - t0,
            )
            rows.append(row)
            if on_log is not None and acc.is_main_process:
                on_log(row)
        if cfg.checkpoint_every and step % int(cfg.checkpoint_every) == 0 and step < total:
            checkpoint()
            saved_at = step
    bar.close()
    if ckpt_root is not None and (saved_at != step or resume_from is None):
        checkpoint()
    full = unsharded_model(acc, model, lambda: PolicyWithValueHead(copy.deepcopy(ref).cpu()))
    if full is None:  # a non-main rank under ZeRO-3
        return rows, None
    final = full.policy
    for p in final.parameters():
        p.requires_grad_(True)
    return rows, final.eval()


def _warn_config_changes(state: Mapping[str, Any], cfg: PPOConfig, seed: int) -> None:
    saved = state.get("config", {})
    now = dataclasses.asdict(cfg)
    changed = sorted(k for k in now if k not in _RESUMABLE_FIELDS and saved.get(k) != now[k])
    if changed:
        log.warning("resuming a PPO checkpoint with changed config fields %s", changed)
    if int(state.get("seed", seed)) != int(seed):
        log.warning("resuming a PPO checkpoint written with seed %s using seed %s",
                    state.get("seed"), seed)
