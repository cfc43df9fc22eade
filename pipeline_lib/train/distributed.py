"""What the trainers need to run as several processes under ``accelerate launch``.

One process per device; every rank runs the same training loop on its share of each batch and
``accelerate`` (DDP or DeepSpeed) averages the gradients. The conventions, shared by the PPO and
the preference trainer:

* **Batches split by rank.** A global batch of B items is cut into contiguous slices
  (:func:`rank_slice`); the sizes differ by at most one. Seeded choices (which prompts, which
  pairs, the minibatch order) use the same numpy generator on every rank, so every rank agrees
  on the global batch and only takes its slice of it.
* **Sums, not means, across ranks.** A loss that is a mean over the global batch is computed on
  each rank as ``sum(local) * world / B``; gradient averaging over ``world`` ranks then gives the
  gradient of ``sum(all) / B`` whatever the split (:func:`global_mean_scale`). Logged statistics
  are sums and counts reduced over ranks (:func:`reduce_sums`).
* **One writer.** Checkpoints and outputs are written by the main process; the others wait.

Everything here is a no-op in a single process, so the trainers have one code path.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any

import torch


def rank_slice(n: int, rank: int, world: int) -> slice:
    """The contiguous part of ``range(n)`` that ``rank`` of ``world`` takes.

    The first ``n % world`` ranks take one item more; a rank may get nothing when n < world.
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def local_part(idx, rank: int, world: int):
    """This rank's slice of a global batch ``idx`` (an index array) and its loss weight.

    A rank left without items (fewer items than ranks) runs the batch's first item with
    weight 0, so that it still joins the gradient all-reduce."""
    local = idx[rank_slice(len(idx), rank, world)]
    if len(local):
        return local, 1.0
    return idx[:1], 0.0


def global_mean_scale(global_count: int, world: int) -> float:
    """Factor turning a local *sum* into this rank's share of a global mean under gradient
    averaging: ``world / global_count`` (see the module docstring)."""
    if global_count < 1:
        raise ValueError(f"global_count must be >= 1, got {global_count}")
    return float(world) / float(global_count)


def whiten_moments(sum_x: float, sum_x2: float, count: float) -> tuple[float, float]:
    """Mean and Bessel-corrected variance from (possibly all-reduced) sums of x and x^2."""
    if count < 1:
        raise ValueError("whitening needs at least one value")
    mean = sum_x / count
    if count < 2:
        return mean, 0.0
    var = (sum_x2 - count * mean * mean) / (count - 1)
    return mean, max(var, 0.0)


def reduce_sums(acc, values: Sequence[float]) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (float64), in every rank."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=acc.device)
    if acc.num_processes > 1:
        t = acc.reduce(t, reduction="sum")
    return [float(v) for v in t.cpu()]


def is_deepspeed(acc) -> bool:
    """True when the accelerator runs DeepSpeed."""
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.DEEPSPEED


def is_zero3(acc) -> bool:
    """True when the accelerator runs DeepSpeed ZeRO stage 3 (sharded weights)."""
    if not is_deepspeed(acc):
        return False
    return int(acc.state.deepspeed_plugin.deepspeed_config.get(
        "zero_optimization", {}).get("stage", 0)) == 3


def configure_deepspeed(acc, micro_batch: int, grad_clip: float | None) -> None:
    """Fill in what a DeepSpeed config leaves to the trainer: the per-process batch (the trainers
    use no DataLoader, so accelerate cannot infer it) and gradient clipping. Call before
    ``acc.prepare``; does nothing without DeepSpeed."""
    if not is_deepspeed(acc):
        return
    ds: dict[str, Any] = acc.state.deepspeed_plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = max(1, int(micro_batch))
    ds["gradient_accumulation_steps"] = 1
    ds["train_batch_size"] = max(1, int(micro_batch)) * acc.num_processes
    ds["gradient_clipping"] = float(grad_clip) if grad_clip else 0.0


def deepspeed_requested() -> bool:
    """True inside ``accelerate launch`` with a DeepSpeed config."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def full_state_dict(acc, model) -> dict[str, torch.Tensor] | None:
    """The unsharded weights of a prepared model on the main process (None elsewhere under
    ZeRO-3). A collective under ZeRO-3: every rank must call it."""
    if is_zero3(acc):
        sd = acc.get_state_dict(model)
        return sd if acc.is_main_process else None
    return acc.unwrap_model(model).state_dict()


def gather_rng_states(acc) -> list[dict[str, Any]]:
    """Every rank's torch RNG state (CPU, and CUDA where present), in rank order."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if acc.num_processes == 1:
        return [state]
    from accelerate.utils import gather_object

    return list(gather_object([state]))


def load_full_weights(model, state: dict[str, torch.Tensor], where: str) -> None:
    """Load a full (unsharded) state dict into ``model``; keys left out must be tied weights."""
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{where}: unexpected weights {result.unexpected_keys[:5]}")
    current = model.state_dict()
    loaded = {current[k].data_ptr() for k in state if k in current}
    params = dict(model.named_parameters(remove_duplicate=False))
    untied = [k for k in result.missing_keys if k in params and current[k].data_ptr() not in loaded]
    if untied:
        raise ValueError(f"{where}: lacks weights {untied[:5]}")


def unsharded_model(acc, model, build_empty):
    """The trained model as an ordinary module holding all its weights, on the main process.

    Without ZeRO-3 that is the unwrapped model itself (every rank holds it). Under ZeRO-3 the
    weights are gathered (a collective) into ``build_empty()`` on the main process; the other
    ranks get None.
    """
    if not is_zero3(acc):
        return acc.unwrap_model(model)
    state = acc.get_state_dict(model)
    if not acc.is_main_process:
        return None
    with _no_zero3_init():
        fresh = build_empty()
    load_full_weights(fresh, {k: v.float() for k, v in state.items()}, "gathered ZeRO-3 weights")
    return fresh


@contextlib.contextmanager
def _no_zero3_init():
    """Build a model on one rank without transformers' ``deepspeed.zero.Init`` (a collective
    that would partition it over all ranks): switch transformers' ZeRO-3 flag off meanwhile."""
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    saved = ref() if ref is not None else None
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if saved is not None:
            hf_deepspeed.set_hf_deepspeed_config(saved)


def finish() -> None:
    """End a launched process cleanly: wait for every rank (the main one writes the outputs),
    then tear the process group down. Without it a rank that exits first can abort in
    DeepSpeed's or gloo's communication threads. Nothing to do in a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_launched_process() -> None:
    """End a launched process that finished its work: :func:`finish`, flush, then
    ``os._exit(0)``. Skipping the interpreter's teardown is deliberate: there, DeepSpeed's
    ZeRO-3 communication threads can abort the process (SIGABRT, "terminate called without an
    active exception") after everything was written, which would fail the job. A job that
    raised never gets here: it exits with its traceback and a non-zero status."""
    import logging
    import sys

    finish()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
