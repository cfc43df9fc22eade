"""What every trainer shares: the accelerator, the warm-up schedule, shuffled batches, right
padding, and an empty model of a config (ZeRO-3 gathering)."""

from __future__ import annotations

import numpy as np
import torch

from pipeline_lib.train.distributed import deepspeed_requested


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
