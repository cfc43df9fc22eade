"""Supervised fine-tuning of the reference policy: next-token loss on corpus texts, or on the
targets of (prompt, target) pairs (completion-only)."""

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
        ids = [*encode_prompt(tokenizer, t), *_eos(tokenizer)]
        out.append(ids[:max_length])
    return out


def _eos(tokenizer) -> list[int]:
    """The EOS an SFT example ends with (none for a tokenizer without one)."""
    return [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]


def encode_completion(tokenizer, prompt: str, target: str,
                      max_length: int) -> tuple[list[int], int] | None:
    """(ids, n_prompt) of a completion-only SFT example: ``encode_prompt(prompt)`` + the
    target's tokens + EOS, cut at ``max_length`` tokens from the right (the target's end first,
    EOS included); the first ``n_prompt`` ids carry no loss. None when the target is empty or
    the prompt alone fills ``max_length`` (no target token would be left)."""
    if not target:
        return None
    head = encode_prompt(tokenizer, prompt)
    if len(head) >= max_length:
        return None
    tail = [*tokenizer(target, add_special_tokens=False)["input_ids"], *_eos(tokenizer)]
    return [*head, *tail][:max_length], len(head)


def encode_sft_examples(
    tokenizer, texts: Sequence[str], prompts: Sequence[str | None] | None, max_length: int
) -> tuple[list[tuple[list[int], int]], dict[str, int]]:
    """Every example as (ids, n_prompt): a text without a prompt is BOS + text + EOS with the
    loss everywhere (n_prompt 0, :func:`encode_lm_texts`); with a prompt, the completion-only
    example of :func:`encode_completion`. Also returns counts: ``prompted``, ``no_target``
    (skipped: empty target), ``too_long`` (skipped: the prompt fills ``max_length``) and
    ``truncated`` (the target cut)."""
    prompts = [None] * len(texts) if prompts is None else list(prompts)
    if len(prompts) != len(texts):
        raise ValueError(f"{len(prompts)} prompts for {len(texts)} SFT texts")
    out: list[tuple[list[int], int]] = []
    stats = dict(prompted=0, no_target=0, too_long=0, truncated=0)
    for text, prompt in zip(texts, prompts, strict=True):
        if prompt is None:
            out.append((encode_lm_texts(tokenizer, [text], max_length)[0], 0))
            continue
        stats["prompted"] += 1
        if not text:
            stats["no_target"] += 1
            continue
        example = encode_completion(tokenizer, prompt, text, max_length)
        if example is None:
            stats["too_long"] += 1
            continue
        n_target = len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1
        stats["truncated"] += int(len(example[0]) - example[1] < n_target)
        out.append(example)
    return out, stats


def _labels(ids: torch.Tensor, attn: torch.Tensor, n_prompt: Sequence[int]) -> torch.Tensor:
    """Next-token labels: padding and each example's first ``n_prompt`` ids are -100."""
    labels = ids.masked_fill(attn == 0, -100)
    for i, m in enumerate(n_prompt):
        if m:
            labels[i, :m] = -100
    return labels


def _n_loss_tokens(example: tuple[list[int], int]) -> int:
    """Positions that carry a loss: every id after the first and after the prompt."""
    ids, m = example
    return max(len(ids) - max(m, 1), 0)


def _lm_loss(model, batch: list[tuple[list[int], int]], pad_id: int,
             device) -> tuple[torch.Tensor, int]:
    ids, attn = pad_batch([ids for ids, _ in batch], pad_id)
    labels = _labels(ids, attn, [m for _, m in batch])
    ids, attn, labels = ids.to(device), attn.to(device), labels.to(device)
    out = model(input_ids=ids, attention_mask=attn, labels=labels)
    return out.loss, int(attn.sum())


@torch.no_grad()
def lm_eval_loss(model, seqs: list[list[int]], pad_id: int, device, batch_size: int,
                 n_prompt: Sequence[int] | None = None) -> float:
    """Token-weighted mean next-token loss on held-out sequences (over the ids after each
    sequence's first ``n_prompt`` ids, when given)."""
    model.eval()
    n_prompt = [0] * len(seqs) if n_prompt is None else list(n_prompt)
    total, count = 0.0, 0
    for s in range(0, len(seqs), batch_size):
        batch = seqs[s : s + batch_size]
        ids, attn = pad_batch(batch, pad_id)
        labels = _labels(ids, attn, n_prompt[s : s + batch_size])
        n = int((labels[:, 1:] != -100).sum())
        if n == 0:
            continue
        out = model(input_ids=ids.to(device), attention_mask=attn.to(device),
                    labels=labels.to(device))
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
    train_prompts: Sequence[str | None] | None = None,
    val_prompts: Sequence[str | None] | None = None,
):
    """Causal-LM fine-tuning (or from-scratch training) on ``train_texts``.

    Without a prompt (``train_prompts`` None, or a None entry) an example is BOS + text + EOS
    with the loss on every token; with one, ``encode_prompt(prompt)`` + the text (the target) +
    EOS with the loss on the target and EOS only (:func:`encode_sft_examples`).
    ``cfg``: the ``sft`` section (``checkpoint_every`` 0 = none); ``device``: the config's.
    Returns (log rows, including those restored from a checkpoint; the trained model
    unwrapped from accelerate). ``on_log`` sees new rows only.
    """
    acc = make_accelerator(device, cfg.mixed_precision)
    world = acc.num_processes
    model_config = model.config
    max_length = int(cfg.max_length)
    train = _train_examples(tokenizer, train_texts, train_prompts, max_length)
    val_examples, _ = encode_sft_examples(tokenizer, val_texts, val_prompts, max_length)
    val = [ids for ids, _ in val_examples]
    val_masked = [m for _, m in val_examples]
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
            tokens += sum(len(train[i][0]) for i in idx)
            bar.update(1)
            if step % int(cfg.log_every) == 0 or step == total:
                emit("train", float(shown.detach()) if world == 1
                     else reduce_sums(acc, [shown.detach()])[0])
            if val and ((cfg.eval_every and step % int(cfg.eval_every) == 0) or step == total):
                emit("val", lm_eval_loss(tr.model, val, tokenizer.pad_token_id, acc.device, bs,
                                         val_masked))
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


def _train_examples(tokenizer, texts: Sequence[str], prompts: Sequence[str | None] | None,
                    max_length: int) -> list[tuple[list[int], int]]:
    """The SFT train examples (:func:`encode_sft_examples`), saying in the log what the
    (prompt, target) pairs lost; none left is an error naming ``sft.max_length``."""
    train, stats = encode_sft_examples(tokenizer, texts, prompts, max_length)
    if stats["prompted"]:
        log.info("sft: %d of %d train examples are (prompt, target) pairs, loss on the target: "
                 "%d skipped without a target, %d skipped because the prompt fills "
                 "sft.max_length (%d tokens), %d targets truncated", stats["prompted"],
                 len(texts), stats["no_target"], stats["too_long"], max_length,
                 stats["truncated"])
    if not train:
        raise ValueError(f"config key sft.max_length ({max_length}): no SFT example is left "
                         f"({stats['too_long']} prompts fill it, {stats['no_target']} rows "
                         "have no target)")
    return train


def _sft_step(acc, tr: PreparedTrainer, train: list[tuple[list[int], int]], idx: np.ndarray,
              pad_id: int) -> torch.Tensor:
    """One optimiser step on the global batch ``idx`` (this rank's slice); returns this rank's
    share of the batch's token-mean loss (the loss itself in one process)."""
    world, rank = acc.num_processes, acc.process_index
    local, weight = local_part(idx, rank, world)
    loss, _ = _lm_loss(tr.model, [train[i] for i in local], pad_id, acc.device)
    shown = loss
    if world > 1:  # token mean over the global batch (see the package docstring)
        n_local = sum(_n_loss_tokens(train[i]) for i in local) * weight
        n_global = sum(_n_loss_tokens(train[i]) for i in idx)
        shown = loss * n_local / n_global  # this rank's share of the global mean
        loss = shown * world
    acc.backward(loss)
    tr.optimizer_step()
    return shown
