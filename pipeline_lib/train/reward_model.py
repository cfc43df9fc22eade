"""Bradley-Terry training of one proxy reward model on preference pairs, each (prompt,
response) tokenised by :func:`pipeline_lib.models.scorers.encode_pairs` exactly as in scoring."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline_lib.math.losses import bradley_terry_loss
from pipeline_lib.models.scorers import PairFormat, encode_pairs
from pipeline_lib.settings.sections import RewardModelSettings
from pipeline_lib.train.checkpoints import (
    save_trainer_checkpoint,
)
from pipeline_lib.train.distributed import (
    global_mean_scale,
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


def _rm_scores(model, tokenizer, prompts: Sequence[str], responses: Sequence[str],
               fmt: PairFormat, device) -> torch.Tensor:
    enc = encode_pairs(tokenizer, prompts, responses, fmt, padding=True,
                       return_tensors="pt").to(device)
    return model(**enc).logits[:, 0].float()


@torch.no_grad()
def pairwise_accuracy(model, tokenizer, prompts: Sequence[str], chosen: Sequence[str],
                      rejected: Sequence[str], fmt: PairFormat, device,
                      batch_size: int) -> tuple[float, float]:
    """(mean Bradley-Terry loss, accuracy) of a reward model on held-out pairs."""
    model.eval()
    losses, correct = [], []
    for s in range(0, len(chosen), batch_size):
        e = s + batch_size
        sw = _rm_scores(model, tokenizer, prompts[s:e], chosen[s:e], fmt, device)
        sl = _rm_scores(model, tokenizer, prompts[s:e], rejected[s:e], fmt, device)
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
    prompts: Sequence[str] | None = None,
):
    """Pairwise Bradley-Terry training on (prompt, chosen) vs (prompt, rejected), each pair
    read as ``reward_models.input/template/max_length`` say (:func:`encode_pairs`, the same
    tokenisation as scoring; ``prompts`` None: empty prompts, the responses alone). ``seed``
    fixes head init (done by the caller) and data order. A ``val_fraction`` of pairs is held
    out and evaluated at the end. ``cfg``: the ``reward_models`` section;
    ``cfg.checkpoint_every`` (0 = none) steps between checkpoints in ``checkpoint_dir``.
    Returns (log rows, the trained model)."""
    fmt = PairFormat.of(cfg)
    prompts = [""] * len(chosen) if prompts is None else list(prompts)
    if not len(prompts) == len(chosen) == len(rejected):
        raise ValueError(f"{len(prompts)} prompts, {len(chosen)} chosen and {len(rejected)} "
                         "rejected responses")
    acc = make_accelerator(device, cfg.mixed_precision)
    world = acc.num_processes
    model_config = model.config
    rng = np.random.default_rng(seed)
    n = len(chosen)
    perm = rng.permutation(n)
    n_val = int(round(float(cfg.val_fraction) * n))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    bs = int(cfg.batch_size)
    steps_per_epoch = math.ceil(len(train_idx) / bs)
    total = steps_per_epoch * int(cfg.epochs)
    expected = dict(trainer="reward_model", seed=seed, pairs=n, processes=world)
    tr = prepare_trainer(acc, model, lr=cfg.lr, weight_decay=cfg.weight_decay,
                         warmup_steps=cfg.warmup_steps, total=total,
                         micro_batch=math.ceil(bs / world), checkpoint_dir=checkpoint_dir,
                         expected=expected, what="the reward model")
    step = tr.step
    tr.model.train()
    first_epoch, skip = divmod(step, steps_per_epoch)
    for _ in range(first_epoch):  # replay the data order of the epochs already trained
        shuffled_batches(len(train_idx), bs, rng)
    t0 = time.perf_counter() - tr.state.get("elapsed_s", 0.0)
    every = int(cfg.checkpoint_every or 0)
    bar = tqdm(total=total, initial=step, desc=f"reward model seed {seed}", unit="step",
               mininterval=5.0, disable=not acc.is_main_process)
    texts = (prompts, chosen, rejected)
    for _ in range(first_epoch, int(cfg.epochs)):
        for b in shuffled_batches(len(train_idx), bs, rng)[skip:]:
            loss, acc_value = _rm_step(acc, tr, tokenizer, texts, train_idx[b], fmt,
                                       float(cfg.center_coef),
                                       step + 1 == total or (step + 1) % int(cfg.log_every) == 0)
            step += 1
            bar.update(1)
            if loss is not None:
                tr.rows.append(dict(step=step, split="train", epoch=step / steps_per_epoch,
                                    loss=loss, lr=tr.scheduler.get_last_lr()[0],
                                    tokens=step * bs, accuracy=acc_value,
                                    elapsed_s=time.perf_counter() - t0))
            if tr.ckpt_dir is not None and every and step % every == 0 and step < total:
                meta = dict(expected, step=step, total=total, elapsed_s=time.perf_counter() - t0)
                save_trainer_checkpoint(acc, tr.ckpt_dir, tr.model, tr.optimizer, tr.scheduler,
                                        meta, tr.rows)
        skip = 0
    bar.close()
    if n_val:
        vloss, vacc = pairwise_accuracy(tr.model, tokenizer, [prompts[i] for i in val_idx],
                                        [chosen[i] for i in val_idx],
                                        [rejected[i] for i in val_idx], fmt, acc.device, bs)
        tr.rows.append(dict(step=step, split="val", epoch=float(cfg.epochs), loss=vloss,
                            lr=tr.scheduler.get_last_lr()[0], tokens=step * bs, accuracy=vacc,
                            elapsed_s=time.perf_counter() - t0))
    return tr.rows, unsharded_model(acc, tr.model,
                                    lambda: empty_model(model_config, "classifier"))


def _rm_step(acc, tr: PreparedTrainer, tokenizer,
             texts: tuple[Sequence[str], Sequence[str], Sequence[str]],
             batch_idx: np.ndarray, fmt: PairFormat, center_coef: float,
             report: bool) -> tuple[float | None, float | None]:
    """One optimiser step on the global batch of pairs ``batch_idx`` (this rank's slice);
    with ``report``, the batch's mean loss and accuracy over every rank."""
    world, rank = acc.num_processes, acc.process_index
    prompts, chosen, rejected = texts
    idx, weight = local_part(batch_idx, rank, world)
    x = [prompts[i] for i in idx]
    sw = _rm_scores(tr.model, tokenizer, x, [chosen[i] for i in idx], fmt, acc.device)
    sl = _rm_scores(tr.model, tokenizer, x, [rejected[i] for i in idx], fmt, acc.device)
    per_pair = bradley_terry_loss(sw, sl, center_coef=center_coef)
    if world == 1:
        loss = per_pair.mean()
    else:  # pair mean over the global batch (see the package docstring)
        loss = per_pair.sum() * weight * global_mean_scale(len(batch_idx), world)
    acc.backward(loss)
    tr.optimizer_step()
    if not report:
        return None, None
    if world == 1:
        return float(loss.detach()), float((sw > sl).float().mean())
    loss_sum, right = reduce_sums(acc, [per_pair.detach().sum() * weight,
                                        (sw > sl).float().sum() * weight])
    return loss_sum / len(batch_idx), right / len(batch_idx)
