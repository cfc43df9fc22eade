"""Training loops for the SFT policy and the Bradley-Terry reward models (accelerate).

Nothing here assumes a GPU: ``accelerate`` places the model on whatever device is there and
handles mixed precision where configured. Every loop returns per-step log rows for the
``train_log`` table.

Under ``accelerate launch`` (several processes) the batch size stays global: each rank takes a
contiguous slice of every batch (:func:`pipeline_lib.distributed.rank_slice`) and scales its
loss so that the averaged gradient is that of the global batch (token mean for SFT, pair mean
for reward models), as in one process; logged values are reduced over ranks; validation runs
on every rank over the whole held-out set. In one process nothing changes.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline_lib.checkpoints import (
    load_trainer_state,
    load_weights_dir,
    read_trainer_checkpoint,
    save_trainer_checkpoint,
)
from pipeline_lib.distributed import (
    configure_deepspeed,
    global_mean_scale,
    local_part,
    reduce_sums,
    unsharded_model,
)
from pipeline_lib.generation import pad_batch
from pipeline_lib.losses import bradley_terry_loss
from pipeline_lib.modeling import encode_prompt

log = logging.getLogger(__name__)


def _accelerator(cfg: Mapping[str, Any]):
    """The job's ``Accelerator``: one process, or one rank of ``accelerate launch``.

    Under ``accelerate launch`` the launcher's config decides DDP or DeepSpeed. DeepSpeed has no
    CPU switch: on a machine without CUDA it runs on its CPU accelerator, for which accelerate
    picks no process-group backend itself, so gloo is named here (how the tests run ZeRO-2/3).
    """
    from accelerate import Accelerator, DataLoaderConfiguration, PartialState

    from pipeline_lib.distributed import deepspeed_requested

    device = cfg.get("device", "auto")
    cpu = device == "cpu" or not torch.cuda.is_available()
    if deepspeed_requested():
        if device == "cpu" and torch.cuda.is_available():
            raise ValueError(
                "config key device is 'cpu' but the accelerate config uses DeepSpeed, which "
                "trains on the GPUs; use device: auto or a DDP / single-process config")
        if cpu:
            PartialState(backend="gloo")
        cpu = False
    # split_batches: a step's batch is global and split over the ranks, so the LR scheduler
    # steps once per step (not once per process).
    return Accelerator(cpu=cpu, mixed_precision=cfg.get("mixed_precision", "no"),
                       dataloader_config=DataLoaderConfiguration(split_batches=True))


def _scheduler(optimizer, warmup: int, total: int):
    from transformers import get_scheduler

    return get_scheduler("linear", optimizer, num_warmup_steps=warmup, num_training_steps=total)


def _batches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    order = rng.permutation(n)
    return [order[s : s + batch_size] for s in range(0, n, batch_size)]


def _pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    return pad_batch(seqs, pad_id)


def encode_lm_texts(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """BOS + text + EOS, truncated to ``max_length`` tokens (EOS dropped when truncated)."""
    out = []
    for t in texts:
        ids = [*encode_prompt(tokenizer, t), tokenizer.eos_token_id]
        out.append(ids[:max_length])
    return out


def _lm_loss(model, batch: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, int]:
    ids, attn = _pad(batch, pad_id)
    labels = ids.masked_fill(attn == 0, -100)
    ids, attn, labels = ids.to(device), attn.to(device), labels.to(device)
    out = model(input_ids=ids, attention_mask=attn, labels=labels)
    return out.loss, int(attn.sum())


@torch.no_grad()
def lm_eval_loss(model, seqs: list[list[int]], pad_id: int, device, batch_size: int) -> float:
    """Token-weighted mean next-token loss on held-out sequences."""
    model.eval()
    total, count = 0.0, 0
    for s in range(0, len(seqs), batch_size):
        batch = seqs[s : s + batch_size]
        ids, attn = _pad(batch, pad_id)
        labels = ids.masked_fill(attn == 0, -100)
        out = model(input_ids=ids.to(device), attention_mask=attn.to(device),
                    labels=labels.to(device))
        n = int((labels[:, 1:] != -100).sum())
        total += float(out.loss) * n
        count += n
    model.train()
    return total / max(count, 1)


def train_sft(
    model,
    tokenizer,
    train_texts: Sequence[str],
    val_texts: Sequence[str],
    cfg: Mapping[str, Any],
    seed: int,
    on_log: Callable[[dict], None] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
):
    """Causal-LM fine-tuning (or from-scratch training) on ``train_texts``.

    cfg keys: epochs, max_steps (optional), batch_size, lr, weight_decay, warmup_steps,
    max_length, log_every, eval_every, checkpoint_every (0 = none), device, mixed_precision.
    Returns (log rows, including those restored from a checkpoint; the trained model
    unwrapped from accelerate). ``on_log`` sees new rows only.
    """
    acc = _accelerator(cfg)
    world, rank = acc.num_processes, acc.process_index
    model_config = model.config
    pad_id = tokenizer.pad_token_id
    train = encode_lm_texts(tokenizer, train_texts, int(cfg["max_length"]))
    val = encode_lm_texts(tokenizer, val_texts, int(cfg["max_length"]))
    bs = int(cfg["batch_size"])
    steps_per_epoch = math.ceil(len(train) / bs)
    total = steps_per_epoch * int(cfg["epochs"])
    if cfg.get("max_steps"):
        total = min(total, int(cfg["max_steps"]))
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    expected = dict(trainer="sft", seed=seed, examples=len(train), processes=world)
    resume, state, rows = read_trainer_checkpoint(ckpt_dir, expected)
    if resume is not None:
        load_weights_dir(model, resume)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=float(cfg["lr"]), weight_decay=float(cfg["weight_decay"])
    )
    scheduler = _scheduler(optimizer, int(cfg["warmup_steps"]), total)
    configure_deepspeed(acc, math.ceil(bs / world), None)
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    step, tokens, elapsed0 = 0, 0, 0.0
    if resume is not None:
        load_trainer_state(acc, optimizer, scheduler, resume)
        step, tokens, elapsed0 = int(state["step"]), int(state["tokens"]), state["elapsed_s"]
        log.info("resuming sft from %s at step %d", resume, step + 1)
    model.train()
    rng = np.random.default_rng(seed)
    epoch, skip = divmod(step, steps_per_epoch)
    for _ in range(epoch):  # replay the data order of the epochs already trained
        _batches(len(train), bs, rng)
    t0 = time.perf_counter() - elapsed0
    log_every, eval_every = int(cfg["log_every"]), int(cfg.get("eval_every") or 0)
    every = int(cfg.get("checkpoint_every") or 0)
    bar = tqdm(total=total, initial=step, desc="sft", unit="step", mininterval=5.0,
               disable=not acc.is_main_process)

    def emit(row: dict) -> None:
        rows.append(row)
        if on_log and acc.is_main_process:
            on_log(row)

    while step < total:
        for idx in _batches(len(train), bs, rng)[skip:]:
            local, weight = local_part(idx, rank, world)
            loss, _ = _lm_loss(model, [train[i] for i in local], pad_id, acc.device)
            shown = loss
            if world > 1:  # token mean over the global batch (see the module docstring)
                n_local = sum(max(len(train[i]) - 1, 0) for i in local) * weight
                n_global = sum(max(len(train[i]) - 1, 0) for i in idx)
                shown = loss * n_local / n_global  # this rank's share of the global mean
                loss = shown * world
            acc.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            tokens += sum(len(train[i]) for i in idx)
            bar.update(1)
            if step % log_every == 0 or step == total:
                value = (float(shown.detach()) if world == 1
                         else reduce_sums(acc, [shown.detach()])[0])
                emit(dict(step=step, split="train", epoch=step / steps_per_epoch,
                          loss=value, lr=scheduler.get_last_lr()[0], tokens=tokens,
                          accuracy=None, elapsed_s=time.perf_counter() - t0))
            if val and ((eval_every and step % eval_every == 0) or step == total):
                emit(dict(step=step, split="val", epoch=step / steps_per_epoch,
                          loss=lm_eval_loss(model, val, pad_id, acc.device, bs),
                          lr=scheduler.get_last_lr()[0], tokens=tokens, accuracy=None,
                          elapsed_s=time.perf_counter() - t0))
            if ckpt_dir is not None and every and step % every == 0 and step < total:
                meta = dict(expected, step=step, tokens=tokens, total=total,
                            elapsed_s=time.perf_counter() - t0)
                save_trainer_checkpoint(acc, ckpt_dir, model, optimizer, scheduler, meta, rows)
            if step >= total:
                break
        skip = 0
    bar.close()
    return rows, unsharded_model(acc, model, lambda: _empty_model(model_config, "causal"))


def _empty_model(config, kind: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
    return cls.from_config(config)


def _rm_scores(model, tokenizer, texts: Sequence[str], max_length: int, device) -> torch.Tensor:
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                    return_tensors="pt").to(device)
    return model(**enc).logits[:, 0].float()


@torch.no_grad()
def pairwise_accuracy(model, tokenizer, chosen: Sequence[str], rejected: Sequence[str],
                      max_length: int, device, batch_size: int) -> tuple[float, float]:
    """(mean Bradley-Terry loss, accuracy) of a reward model on held-out pairs."""
    model.eval()
    losses, correct = [], []
    for s in range(0, len(chosen), batch_size):
        sw = _rm_scores(model, tokenizer, chosen[s : s + batch_size], max_length, device)
        sl = _rm_scores(model, tokenizer, rejected[s : s + batch_size], max_length, device)
        losses.append(bradley_terry_loss(sw, sl).cpu())
        correct.append((sw > sl).float().cpu())
    model.train()
    return float(torch.cat(losses).mean()), float(torch.cat(correct).mean())


def train_reward_model(
    model,
    tokenizer,
    chosen: Sequence[str],
    rejected: Sequence[str],
    cfg: Mapping[str, Any],
    seed: int,
    checkpoint_dir: str | os.PathLike | None = None,
):
    """Pairwise Bradley-Terry training; ``seed`` fixes head init (done by the caller) and
    data order. A ``val_fraction`` of pairs is held out and evaluated at the end.
    ``cfg["checkpoint_every"]`` (0 = none) steps between checkpoints in ``checkpoint_dir``.
    Returns (log rows, the trained model)."""
    acc = _accelerator(cfg)
    world, rank = acc.num_processes, acc.process_index
    model_config = model.config
    rng = np.random.default_rng(seed)
    n = len(chosen)
    perm = rng.permutation(n)
    n_val = int(round(float(cfg["val_fraction"]) * n))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    bs, max_len = int(cfg["batch_size"]), int(cfg["max_length"])
    steps_per_epoch = math.ceil(len(train_idx) / bs)
    total = steps_per_epoch * int(cfg["epochs"])
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    expected = dict(trainer="reward_model", seed=seed, pairs=n, processes=world)
    resume, state, rows = read_trainer_checkpoint(ckpt_dir, expected)
    if resume is not None:
        load_weights_dir(model, resume)
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(cfg["lr"]),
                                  weight_decay=float(cfg["weight_decay"]))
    scheduler = _scheduler(optimizer, int(cfg["warmup_steps"]), total)
    configure_deepspeed(acc, math.ceil(bs / world), None)
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    step, elapsed0 = 0, 0.0
    if resume is not None:
        load_trainer_state(acc, optimizer, scheduler, resume)
        step, elapsed0 = int(state["step"]), state["elapsed_s"]
        log.info("resuming the reward model from %s at step %d", resume, step + 1)
    model.train()
    first_epoch, skip = divmod(step, steps_per_epoch)
    for _ in range(first_epoch):  # replay the data order of the epochs already trained
        _batches(len(train_idx), bs, rng)
    t0 = time.perf_counter() - elapsed0
    every = int(cfg.get("checkpoint_every") or 0)
    bar = tqdm(total=total, initial=step, desc=f"reward model seed {seed}", unit="step",
               mininterval=5.0, disable=not acc.is_main_process)
    for _ in range(first_epoch, int(cfg["epochs"])):
        for b in _batches(len(train_idx), bs, rng)[skip:]:
            batch_idx = train_idx[b]
            idx, weight = local_part(batch_idx, rank, world)
            sw = _rm_scores(model, tokenizer, [chosen[i] for i in idx], max_len, acc.device)
            sl = _rm_scores(model, tokenizer, [rejected[i] for i in idx], max_len, acc.device)
            per_pair = bradley_terry_loss(sw, sl, center_coef=float(cfg["center_coef"]))
            if world == 1:
                loss = per_pair.mean()
            else:  # pair mean over the global batch (see the module docstring)
                loss = per_pair.sum() * weight * global_mean_scale(len(batch_idx), world)
            acc.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            bar.update(1)
            if step % int(cfg["log_every"]) == 0 or step == total:
                if world == 1:
                    value, accuracy = float(loss.detach()), float((sw > sl).float().mean())
                else:
                    loss_sum, right = reduce_sums(acc, [per_pair.detach().sum() * weight,
                                                        (sw > sl).float().sum() * weight])
                    value, accuracy = loss_sum / len(batch_idx), right / len(batch_idx)
                rows.append(dict(step=step, split="train", epoch=step / steps_per_epoch,
                                 loss=value, lr=scheduler.get_last_lr()[0],
                                 tokens=step * bs, accuracy=accuracy,
                                 elapsed_s=time.perf_counter() - t0))
            if ckpt_dir is not None and every and step % every == 0 and step < total:
                meta = dict(expected, step=step, total=total, elapsed_s=time.perf_counter() - t0)
                save_trainer_checkpoint(acc, ckpt_dir, model, optimizer, scheduler, meta, rows)
        skip = 0
    bar.close()
    if n_val:
        vloss, vacc = pairwise_accuracy(model, tokenizer, [chosen[i] for i in val_idx],
                                        [rejected[i] for i in val_idx], max_len, acc.device, bs)
        rows.append(dict(step=step, split="val", epoch=float(cfg["epochs"]), loss=vloss,
                         lr=scheduler.get_last_lr()[0], tokens=step * bs, accuracy=vacc,
                         elapsed_s=time.perf_counter() - t0))
    return rows, unsharded_model(acc, model, lambda: _empty_model(model_config, "classifier"))
