"""What every trainer shares: the accelerator, the warm-up schedule, shuffled batches, right
padding, and an empty model of a config (ZeRO-3 gathering)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline_lib.train.checkpoints import (
    load_trainer_state,
    load_weights_dir,
    read_trainer_checkpoint,
)
from pipeline_lib.train.distributed import configure_deepspeed, deepspeed_requested

log = logging.getLogger(__name__)


def make_accelerator(device: str = "auto", mixed_precision: str = "no"):
    """The job's ``Accelerator`` (``device``: auto, cpu or cuda; ``mixed_precision``: no, fp16
    or bf16): one process, or one rank of ``accelerate launch``.

    Under ``accelerate launch`` the launcher's config decides DDP or DeepSpeed. DeepSpeed has no
    CPU switch: on a machine without CUDA it runs on its CPU accelerator, for which accelerate
    picks no process-group backend itself, so gloo is named here (how the tests run ZeRO-2/3).
    """
    from accelerate import Accelerator, DataLoaderConfiguration, PartialState


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
    return Accelerator(cpu=cpu, mixed_precision=mixed_precision,
                       dataloader_config=DataLoaderConfiguration(split_batches=True))


def warmup_scheduler(optimizer, warmup: int, total: int):
    """Linear warm-up over ``warmup`` steps, then linear decay to 0 at ``total``."""
    from transformers import get_scheduler

    return get_scheduler("linear", optimizer, num_warmup_steps=warmup, num_training_steps=total)


def shuffled_batches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch's batches of indices 0..n-1 in an order drawn from ``rng``."""
    order = rng.permutation(n)
    return [order[s : s + batch_size] for s in range(0, n, batch_size)]


def empty_model(config, kind: str):
    """A model of ``config`` (``kind`` causal or classifier) to load gathered ZeRO-3 weights into."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
    return cls.from_config(config)


@dataclass
class PreparedTrainer:
    """An SFT or reward-model run after :func:`prepare_trainer`: the accelerate-prepared model,
    AdamW and linear schedule, and the progress restored from ``checkpoint_dir/last``."""

    model: Any
    optimizer: Any
    scheduler: Any
    ckpt_dir: Path | None
    rows: list[dict]
    state: dict[str, Any]  # the restored trainer state; empty for a new run

    @property
    def step(self) -> int:
        return int(self.state.get("step", 0))

    def optimizer_step(self) -> None:
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()


def prepare_trainer(acc, model, *, lr: float, weight_decay: float, warmup_steps: int,
                    total: int, micro_batch: int, checkpoint_dir: str | os.PathLike | None,
                    expected: dict[str, Any], what: str) -> PreparedTrainer:
    """Load the weights of a checkpoint of the same run (``expected``: its invariants) when
    there is one, build AdamW with a linear warm-up schedule over ``total`` steps, prepare both
    with ``acc`` and restore the optimizer, schedule and RNG states."""
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    resume, state, rows = read_trainer_checkpoint(ckpt_dir, expected)
    if resume is not None:
        load_weights_dir(model, resume)
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(lr),
                                  weight_decay=float(weight_decay))
    scheduler = warmup_scheduler(optimizer, int(warmup_steps), total)
    configure_deepspeed(acc, micro_batch, None)
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    if resume is not None:
        load_trainer_state(acc, optimizer, scheduler, resume)
        log.info("resuming %s from %s at step %d", what, resume, int(state["step"]) + 1)
    return PreparedTrainer(model, optimizer, scheduler, ckpt_dir, rows,
                           dict(state) if resume is not None else {})
