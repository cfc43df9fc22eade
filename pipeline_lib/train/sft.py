"""Supervised fine-tuning of the reference policy (next-token loss on corpus texts)."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline_lib.generation.sampling import pad_batch
from pipeline_lib.models.encoding import encode_prompt
from pipeline_lib.settings.sections import SFTSettings
from pipeline_lib.train.checkpoints import (
    save_trainer_checkpoint,
)
from pipeline_lib.train.distributed import (
    local_part,
    reduce_sums,
    unsharded_model,
)
from pipeline_lib.train.runtime import (
    PreparedTrainer,
    empty_model,
    make_accelerator,
    prepare_trainer,
    shuffled_batches,
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
    world = acc.num_processes
    model_config = model.config
    train = encode_lm_texts(tokenizer, train_texts, int(cfg.max_length))
    val = encode_lm_texts(tokenizer, val_texts, int(cfg.max_length))
    bs = int(cfg.batch_size)
    steps_per_epoch = math.ceil(len(train) / bs)
    total = steps_per_epoch * int(cfg.epochs)
    if cfg.max_steps:
        total = min(total, int(cfg.max_steps))
    expected = dict(trainer="sft", seed=seed, examples=len(train), processes=world)
    tr = prepare_trainer(acc, model, lr=cfg.lr, weight_decay=cfg.weight_decay,
                         warmup_steps=cfg.warmup_steps, total=total,
                         micro_batch=math.ceil(bs / world), checkpoint_dir=checkpoint_dir,
                         expected=expected, what="sft")
    step, tokens = tr.step, int(tr.state.get("tokens", 0))
    tr.model.train()
    rng = np.random.default_rng(seed)
    epoch, skip = divmod(step, steps_per_epoch)
    for _ in range(epoch):  # replay the data order of the epochs already trained
        shuffled_batches(len(train), bs, rng)
    t0 = time.perf_counter() - tr.state.get("elapsed_s", 0.0)
    every = int(cfg.checkpoint_every or 0)
    bar = tqdm(total=total, initial=step, desc="sft", unit="step", mininterval=5.0,
               disable=not acc.is_main_process)

    def emit(split: str, loss: float) -> None:
        row = dict(step=step, split=split, epoch=step / steps_per_epoch, loss=loss,
                   lr=tr.scheduler.get_last_lr()[0], tokens=tokens, accuracy=None,
                   elapsed_s=time.perf_counter() - t0)
        tr.rows.append(row)
        if on_log and acc.is_main_process:
            on_log(row)

    while step < total:
        for idx in shuffled_batches(len(train), bs, rng)[skip:]:
            shown = _sft_step(acc, tr, train, idx, tokenizer.pad_token_id)
            step += 1
            tokens += sum(len(train[i]) for i in idx)
            bar.update(1)
            if step % int(cfg.log_every) == 0 or step == total:
                emit("train", float(shown.detach()) if world == 1
                     else reduce_sums(acc, [shown.detach()])[0])
            if val and ((cfg.eval_every and step % int(cfg.eval_every) == 0) or step == total):
                emit("val", lm_eval_loss(tr.model, val, tokenizer.pad_token_id, acc.device, bs))
            if tr.ckpt_dir is not None and every and step % every == 0 and step < total:
                meta = dict(expected, step=step, tokens=tokens, total=total,
                            elapsed_s=time.perf_counter() - t0)
                save_trainer_checkpoint(acc, tr.ckpt_dir, tr.model, tr.optimizer, tr.scheduler,
                                        meta, tr.rows)
            if step >= total:
                break
        skip = 0
    bar.close()
    return tr.rows, unsharded_model(acc, tr.model, lambda: empty_model(model_config, "causal"))


def _sft_step(acc, tr: PreparedTrainer, train: list[list[int]], idx: np.ndarray,
              pad_id: int) -> torch.Tensor:
    """One optimiser step on the global batch ``idx`` (this rank's slice); returns this rank's
    share of the batch's token-mean loss (the loss itself in one process)."""
    world, rank = acc.num_processes, acc.process_index
    local, weight = local_part(idx, rank, world)
    loss, _ = _lm_loss(tr.model, [train[i] for i in local], pad_id, acc.device)
    shown = loss
    if world > 1:  # token mean over the global batch (see the package docstring)
        n_local = sum(max(len(train[i]) - 1, 0) for i in local) * weight
        n_global = sum(max(len(train[i]) - 1, 0) for i in idx)
        shown = loss * n_local / n_global  # this rank's share of the global mean
        loss = shown * world
    acc.backward(loss)
    tr.optimizer_step()
    return shown
