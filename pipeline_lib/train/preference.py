"""Offline preference training on best/worst-of-n pairs: DPO, IPO, BoNBoN and BoN-SFT.

One trainer serves the four methods of ``docs/METHODS.md`` ("Preference losses"). Pairs come from the
reference cache (:func:`bon_pairs`), which also carries the *reference* log-probabilities
``log pi_ref(y|x)`` of every response (summed over the response tokens, EOS included, given
``encode_prompt(prompt)``, under the sampling distribution of ``generation``: logits /
temperature), so no reference model is held in memory: the policy log-ratio is
``h(y) = log pi_theta(y|x) - ref_logprob(y)``, with the policy's log-probs at the same
temperature (``PreferenceConfig.temperature``; top-p / top-k truncation is refused).

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

**Mixed precision.** The cached reference log-probs are float32 forward passes; under
``mixed_precision`` bf16 / fp16 the policy's own forward pass (accelerate's autocast, or
DeepSpeed's half-precision weights) gives other values for the same weights, so ``h`` would not be
0 at step 0. With ``mixed_precision != "no"`` the trainer therefore replaces the cached values,
before its first update, by the initial policy's (= pi_ref's) log-probs computed through the
prepared model exactly as the training steps compute them: the same forward function, precision,
device and rank slices, batch by batch in epoch 0's order, so that the step-0 forward pass is
bitwise the recomputed one and ``h = 0`` exactly at step 0 (later, ``h`` measures the updates,
not precision round-off; :func:`initial_reference_logprobs`). These values are stored in the checkpoint and a resumed
run reuses them (never recomputed from resumed weights), so it equals the uninterrupted run; a
run that started without mixed precision keeps the cached values when resumed with it. With
``mixed_precision: "no"`` (the default) the cached values are used unchanged. On CPU accelerate
runs ``fp16`` in float32 (no autocast; a warning says so), ``bf16`` under CPU autocast.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from tqdm.auto import tqdm

from pipeline_lib.train.checkpoints import (
    load_trainer_state,
    load_weights_dir,
    read_trainer_checkpoint,
    save_trainer_checkpoint,
)
from pipeline_lib.train.distributed import (
    configure_deepspeed,
    global_mean_scale,
    is_deepspeed,
    local_part,
    reduce_sums,
    unsharded_model,
)
from pipeline_lib.train.pairs import EncodedPairs, encode_pairs, max_positions
from pipeline_lib.train.preference_objective import (
    PreferenceConfig,
    effective_beta,
    policy_logprobs,
    preference_loss,
)
from pipeline_lib.train.runtime import empty_model, make_accelerator, warmup_scheduler

log = logging.getLogger(__name__)


# Settings that must not change when a run resumes from a checkpoint (the others -- epochs,
# max_steps, checkpoint_every, log_every, device, mixed_precision -- may).
_RESUME_INVARIANT = ("method", "beta", "n", "alpha", "label_smoothing", "bonbon_variant",
                     "beta_override", "batch_size", "lr", "weight_decay", "warmup_steps",
                     "max_grad_norm", "disable_dropout")


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
    data = encode_pairs(pairs, tokenizer, max_positions(policy))
    run = _start(policy, tokenizer, data, cfg, seed, checkpoint_dir)
    if run.step >= run.total:
        log.info("checkpoint is at step %d >= %d steps: nothing to train", run.step, run.total)
        return run.rows, _final_model(run)
    bar = tqdm(total=run.total, initial=run.step, desc=f"{cfg.method} seed {seed}", unit="step",
               mininterval=5.0, disable=not run.acc.is_main_process)
    while run.step < run.total:
        batch = _train_step(run)
        bar.update(1)
        if run.step % int(cfg.log_every) == 0 or run.step == run.total:
            row = _log_row(run, batch)
            run.rows.append(row)
            if on_log and run.acc.is_main_process:
                on_log(row)
        if run.step % int(cfg.checkpoint_every) == 0 and run.step < run.total:
            _checkpoint(run)
    bar.close()
    _checkpoint(run)
    return run.rows, _final_model(run)


@dataclass
class _Run:
    """A preference run: the prepared model, optimizer and schedule, the encoded pairs and the
    progress so far (restored from a checkpoint)."""

    cfg: PreferenceConfig
    seed: int
    acc: Any
    model: Any
    model_config: Any
    optimizer: Any
    scheduler: Any
    tokenizer: Any
    data: EncodedPairs
    pad_id: int
    total: int
    steps_per_epoch: int
    expected: dict
    ckpt_dir: Path | None
    rows: list[dict]
    ref_c: torch.Tensor  # the reference log-probs of the chosen responses (module docstring)
    ref_r: torch.Tensor  # ... and of the rejected ones
    # the precision the reference log-probs were recomputed at (None: the cached values)
    ref_precision: str | None = None
    step: int = 0
    tokens: int = 0
    pairs_seen: int = 0
    t0: float = 0.0


def _start(policy, tokenizer, data: EncodedPairs, cfg: PreferenceConfig, seed: int,
           checkpoint_dir) -> _Run:
    """Accelerator, optimizer and schedule; resumes from ``checkpoint_dir/last`` when present."""
    n_pairs = len(data.prompt_ids)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        tokenizer.eos_token_id
    bs = int(cfg.batch_size)
    steps_per_epoch = math.ceil(n_pairs / bs)
    total = steps_per_epoch * int(cfg.epochs)
    if cfg.max_steps:
        total = min(total, int(cfg.max_steps))
    acc = make_accelerator(cfg.device, cfg.mixed_precision)
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
    run = _Run(cfg, seed, acc, model, model_config, optimizer, scheduler, tokenizer, data,
               pad_id, total, steps_per_epoch, expected, ckpt_dir, rows,
               torch.as_tensor(data.ref_chosen, dtype=torch.float64),
               torch.as_tensor(data.ref_rejected, dtype=torch.float64))
    elapsed0 = 0.0
    if resume is not None:
        load_trainer_state(acc, optimizer, scheduler, resume)
        run.step, run.tokens = int(state["step"]), int(state["tokens"])
        run.pairs_seen, elapsed0 = int(state["pairs"]), float(state["elapsed_s"])
    model.eval()  # reference log-probs are taken without dropout
    _set_reference(run, state if resume is not None else None)
    if not cfg.disable_dropout:
        model.train()
    run.t0 = time.perf_counter() - elapsed0
    return run


def _set_reference(run: _Run, state: dict | None) -> None:
    """The reference log-probs of the run (module docstring, "Mixed precision"): a resumed run's
    from its checkpoint (``state``), a new mixed-precision run's recomputed with the initial
    weights, otherwise the cached ones already in ``run``."""
    cfg, acc = run.cfg, run.acc
    if cfg.mixed_precision == "fp16" and not acc.native_amp and not is_deepspeed(acc):
        log.warning("mixed_precision fp16 on %s: accelerate runs it in float32 (no autocast)",
                    acc.device)
    if state is not None:
        stored = state.get("reference")
        if stored is None:
            if cfg.mixed_precision != "no":
                log.warning("the checkpoint's run started without mixed precision: resuming "
                            "under %s with the cached float32 reference log-probs",
                            cfg.mixed_precision)
            return
        if stored["precision"] != cfg.mixed_precision:
            log.warning("resuming under mixed_precision %s with the reference log-probs of the "
                        "run's start (%s)", cfg.mixed_precision, stored["precision"])
        run.ref_c = torch.tensor(stored["chosen"], dtype=torch.float64)
        run.ref_r = torch.tensor(stored["rejected"], dtype=torch.float64)
        run.ref_precision = stored["precision"]
        if len(run.ref_c) != len(run.data.prompt_ids):
            raise ValueError("the checkpoint's reference log-probs do not match the pairs")
        return
    if cfg.mixed_precision == "no":
        return
    t0 = time.perf_counter()
    ref_c, ref_r = initial_reference_logprobs(
        run.model, run.data, acc, batch_size=int(cfg.batch_size), seed=run.seed,
        pad_id=run.pad_id, temperature=float(cfg.temperature))
    delta = np.abs(np.concatenate([ref_c - run.data.ref_chosen, ref_r - run.data.ref_rejected]))
    log.info("reference log-probs recomputed under %s in %.1f s (vs the cached float32 values: "
             "mean |diff| %.3g, max %.3g nats)", cfg.mixed_precision,
             time.perf_counter() - t0, float(delta.mean()), float(delta.max()))
    run.ref_c = torch.as_tensor(ref_c, dtype=torch.float64)
    run.ref_r = torch.as_tensor(ref_r, dtype=torch.float64)
    run.ref_precision = cfg.mixed_precision


def _epoch_batch(seed: int, epoch: int, pos: int, n_pairs: int, batch_size: int) -> np.ndarray:
    """The pair indices of batch ``pos`` of ``epoch`` (epoch e's order is
    ``default_rng([seed, e]).permutation``)."""
    order = np.random.default_rng([int(seed), epoch]).permutation(n_pairs)
    return order[pos * batch_size : (pos + 1) * batch_size]


@torch.no_grad()
def initial_reference_logprobs(model, data: EncodedPairs, acc, *, batch_size: int, seed: int,
                               pad_id: int, temperature: float = 1.0
                               ) -> tuple[np.ndarray, np.ndarray]:
    """(chosen, rejected) summed log-probs of every pair under ``model`` (the prepared policy
    before any update, in ``eval()`` mode) computed as :func:`train_preference`'s steps
    compute them: epoch 0's global batches of ``batch_size`` in the order of ``seed``, this
    rank's slice of each, chosen and rejected in one forward pass, then gathered so that every
    rank holds all pairs. Every pair's forward pass in epoch 0 is therefore bitwise this one.
    A collective (each rank makes the same forward calls, as ZeRO-3 needs)."""
    world, rank = acc.num_processes, acc.process_index
    n = len(data.prompt_ids)
    out = np.zeros((2, n), dtype=np.float64)
    for pos in range(math.ceil(n / batch_size)):
        idx = _epoch_batch(seed, 0, pos, n, batch_size)
        local, weight = local_part(idx, rank, world)
        nb = len(local)
        prompts = [data.prompt_ids[i] for i in local]
        responses = [data.chosen_ids[i] for i in local] + [data.rejected_ids[i] for i in local]
        logps = policy_logprobs(model, prompts + prompts, responses, pad_id, acc.device,
                                temperature).double().cpu().numpy()
        if weight:  # weight 0: a rank left without pairs forwards a dummy
            out[0, local], out[1, local] = logps[:nb], logps[nb:]
    if world > 1:  # each pair was filled on one rank (zeros elsewhere): a sum gathers them
        out = np.array(reduce_sums(acc, out.ravel().tolist()), dtype=np.float64).reshape(2, n)
    if not np.isfinite(out).all():
        bad = int(np.flatnonzero(~np.isfinite(out).all(axis=0))[0])
        raise ValueError(f"pair {bad}: non-finite reference log-prob recomputed under mixed "
                         "precision (fp16 overflow?); use bf16 or mixed_precision: no")
    return out[0], out[1]


@dataclass
class _Batch:
    """One step's batch on this rank: its size, weight, log-probs and per-pair losses."""

    size: int
    weight: float
    pc: torch.Tensor
    pr: torch.Tensor
    rc: torch.Tensor
    rr: torch.Tensor
    per_pair: torch.Tensor
    grad_norm: float | None


def _train_step(run: _Run) -> _Batch:
    """One optimiser step on the next global batch (epoch e's order is
    ``default_rng([seed, e]).permutation``); this rank takes its slice."""
    cfg, acc, data = run.cfg, run.acc, run.data
    world, rank = acc.num_processes, acc.process_index
    bs = int(cfg.batch_size)
    epoch, pos = divmod(run.step, run.steps_per_epoch)
    idx = _epoch_batch(run.seed, epoch, pos, len(data.prompt_ids), bs)
    b = len(idx)
    local, weight = local_part(idx, rank, world)  # weight 0: a rank left without pairs
    nb = len(local)
    prompts = [data.prompt_ids[i] for i in local]
    responses = [data.chosen_ids[i] for i in local] + [data.rejected_ids[i] for i in local]
    logps = policy_logprobs(run.model, prompts + prompts, responses, run.pad_id, acc.device,
                            float(cfg.temperature))
    logps = logps.double()
    pc, pr = logps[:nb], logps[nb:]
    rc, rr = run.ref_c[local].to(logps.device), run.ref_r[local].to(logps.device)
    per_pair = preference_loss(cfg, pc, pr, rc, rr) * weight
    if world == 1:  # the same arithmetic as before multi-process support
        loss = per_pair.mean()
    else:
        loss = per_pair.sum() * global_mean_scale(b, world)
    acc.backward(loss)
    grad_norm = None
    if cfg.max_grad_norm:
        grad_norm = acc.clip_grad_norm_(run.model.parameters(), float(cfg.max_grad_norm))
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad()
    run.step += 1
    run.tokens += sum(2 * len(data.prompt_ids[i]) + len(data.chosen_ids[i])
                      + len(data.rejected_ids[i]) for i in idx)
    run.pairs_seen += b
    return _Batch(b, weight, pc, pr, rc, rr, per_pair,
                  None if grad_norm is None else float(grad_norm))


@torch.no_grad()
def _log_row(run: _Run, batch: _Batch) -> dict:
    """The log row of the step just taken (statistics of its batch, reduced over ranks)."""
    weight = batch.weight
    hw = (batch.pc - batch.rc).detach() * weight
    hl = (batch.pr - batch.rr).detach() * weight
    sums = reduce_sums(run.acc, [
        batch.per_pair.sum(), (hw - hl).sum(), ((hw > hl).double() * weight).sum(),
        batch.pc.detach().sum() * weight, batch.pr.detach().sum() * weight, hw.sum()])
    loss_s, margin_s, right_s, pc_s, pr_s, hw_s = (v / batch.size for v in sums)
    return dict(
        step=run.step, split="train", epoch=run.step / run.steps_per_epoch, loss=loss_s,
        lr=run.scheduler.get_last_lr()[0], tokens=run.tokens, pairs=run.pairs_seen,
        reward_margin=margin_s, accuracy=right_s, chosen_logp=pc_s, rejected_logp=pr_s,
        kl_best_k1=hw_s, grad_norm=batch.grad_norm, elapsed_s=time.perf_counter() - run.t0,
    )


def _checkpoint(run: _Run) -> None:
    if run.ckpt_dir is None:
        return
    meta = dict(run.expected, step=run.step, tokens=run.tokens, pairs=run.pairs_seen,
                total=run.total, config=dataclasses.asdict(run.cfg),
                beta=effective_beta(run.cfg), elapsed_s=time.perf_counter() - run.t0)
    if run.ref_precision is not None:  # recomputed: a resumed run reuses them (JSON is exact)
        meta["reference"] = dict(precision=run.ref_precision, chosen=run.ref_c.tolist(),
                                 rejected=run.ref_r.tolist())
    save_trainer_checkpoint(run.acc, run.ckpt_dir, run.model, run.optimizer, run.scheduler, meta,
                            run.rows, run.tokenizer)


def _final_model(run: _Run):
    return unsharded_model(run.acc, run.model, lambda: empty_model(run.model_config, "causal"))
