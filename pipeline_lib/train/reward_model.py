"""Bradley-Terry training of one proxy reward model on preference pairs."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline_lib.math.losses import bradley_terry_loss
from pipeline_lib.settings.sections import RewardModelSettings
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
from pipeline_lib.train.runtime import (
    empty_model,
    make_accelerator,
    shuffled_batches,
    warmup_scheduler,
)

log = logging.getLogger(__name__)


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
    cfg: RewardModelSettings,
    device: str,
    seed: int,
    checkpoint_dir: str | os.PathLike | None = None,
):
    """Pairwise Bradley-Terry training; ``seed`` fixes head init (done by the caller) and
    data order. A ``val_fraction`` of pairs is held out and evaluated at the end.
    ``cfg``: the ``reward_models`` section; ``cfg.checkpoint_every`` (0 = none) steps between checkpoints in ``checkpoint_dir``.
    Returns (log rows, the trained model)."""
    acc = make_accelerator(device, cfg.mixed_precision)
    world, rank = acc.num_processes, acc.process_index
    model_config = model.config
    rng = np.random.default_rng(seed)
    n = len(chosen)
    perm = rng.permutation(n)
    n_val = int(round(float(cfg.val_fraction) * n))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    bs, max_len = int(cfg.batch_size), int(cfg.max_length)
    steps_per_epoch = math.ceil(len(train_idx) / bs)
    total = steps_per_epoch * int(cfg.epochs)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    expected = dict(trainer="reward_model", seed=seed, pairs=n, processes=world)
    resume, state, rows = read_trainer_checkpoint(ckpt_dir, expected)
    if resume is not None:
        load_weights_dir(model, resume)
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(cfg.lr),
                                  weight_decay=float(cfg.weight_decay))
    scheduler = warmup_scheduler(optimizer, int(cfg.warmup_steps), total)
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
        shuffled_batches(len(train_idx), bs, rng)
    t0 = time.perf_counter() - elapsed0
    every = int(cfg.checkpoint_every or 0)
    bar = tqdm(total=total, initial=step, desc=f"reward model seed {seed}", unit="step",
               mininterval=5.0, disable=not acc.is_main_process)
    for _ in range(first_epoch, int(cfg.epochs)):
        for b in shuffled_batches(len(train_idx), bs, rng)[skip:]:
            batch_idx = train_idx[b]
            idx, weight = local_part(batch_idx, rank, world)
            sw = _rm_scores(model, tokenizer, [chosen[i] for i in idx], max_len, acc.device)
            sl = _rm_scores(model, tokenizer, [rejected[i] for i in idx], max_len, acc.device)
            per_pair = bradley_terry_loss(sw, sl, center_coef=float(cfg.center_coef))
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
            if step % int(cfg.log_every) == 0 or step == total:
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
        rows.append(dict(step=step, split="val", epoch=float(cfg.epochs), loss=vloss,
                         lr=scheduler.get_last_lr()[0], tokens=step * bs, accuracy=vacc,
                         elapsed_s=time.perf_counter() - t0))
    return rows, unsharded_model(acc, model, lambda: empty_model(model_config, "classifier"))
