"""Supervised fine-tuning of the reference policy (next-token loss on corpus texts)."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline_lib.generation.sampling import pad_batch
from pipeline_lib.models.encoding import encode_prompt
from pipeline_lib.settings.sections import SFTSettings
from pipeline_lib.train.checkpoints import (
    load_trainer_state,
    load_weights_dir,
    read_trainer_checkpoint,
    save_trainer_checkpoint,
)
from pipeline_lib.train.distributed import (
    configure_deepspeed,
    local_part,
    reduce_sums,
    unsharded_model,
)
from pipeline_lib.train.runtime import (
    empty_model,
    make_accelerator,
    shuffled_batches,
    warmup_scheduler,
)

log = logging.getLogger(__name__)


def encode_lm_texts(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """BOS + text + EOS, truncated to ``max_length`` tokens (EOS dropped when truncated)."""
    out = []
    for t in texts:
        ids = [*encode_prompt(tokenizer, t), tokenizer.eos_token_id]
        out.append(ids[:max_length])
    return out


def _lm_loss(model, batch: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, int]:
    ids, attn = pad_batch(batch, pad_id)
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
        ids, attn = pad_batch(batch, pad_id)
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
    cfg: SFTSettings,
    device: str,
    seed: int,
    on_log: Callable[[dict], None] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
):
    """Causal-LM fine-tuning (or from-scratch training) on ``train_texts``.

    ``cfg``: the ``sft`` section (``checkpoint_every`` 0 = none); ``device``: the config's.
    Returns (log rows, including those restored from a checkpoint; the trained model
    unwrapped from accelerate). ``on_log`` sees new rows only.
    """
    acc = make_accelerator(device, cfg.mixed_precision)
    world, rank = acc.num_processes, acc.process_index
    model_config = model.config
    pad_id = tokenizer.pad_token_id
    train = encode_lm_texts(tokenizer, train_texts, int(cfg.max_length))
    val = encode_lm_texts(tokenizer, val_texts, int(cfg.max_length))
    bs = int(cfg.batch_size)
    steps_per_epoch = math.ceil(len(train) / bs)
    total = steps_per_epoch * int(cfg.epochs)
    if cfg.max_steps:
        total = min(total, int(cfg.max_steps))
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    expected = dict(trainer="sft", seed=seed, examples=len(train), processes=world)
    resume, state, rows = read_trainer_checkpoint(ckpt_dir, expected)
    if resume is not None:
        load_weights_dir(model, resume)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=float(cfg.lr), weight_decay=float(cfg.weight_decay)
    )
    scheduler = warmup_scheduler(optimizer, int(cfg.warmup_steps), total)
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
        shuffled_batches(len(train), bs, rng)
    t0 = time.perf_counter() - elapsed0
    log_every, eval_every = int(cfg.log_every), int(cfg.eval_every or 0)
    every = int(cfg.checkpoint_every or 0)
    bar = tqdm(total=total, initial=step, desc="sft", unit="step", mininterval=5.0,
               disable=not acc.is_main_process)

    def emit(row: dict) -> None:
        rows.append(row)
        if on_log and acc.is_main_process:
            on_log(row)

    while step < total:
        for idx in shuffled_batches(len(train), bs, rng)[skip:]:
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
    return rows, unsharded_model(acc, model, lambda: empty_model(model_config, "causal"))
