"""Training checkpoints shared by every trainer (SFT, reward models, preference, PPO), in one or
several processes.

Layout of ``checkpoint_dir/last/`` (built as ``.last.tmp`` and swapped in by renames, so an
interrupted save never leaves a ``last`` that looks complete; a directory cannot be
``os.replace``d onto a non-empty one, so the old ``last`` is first renamed to ``last.old``, which
:func:`find_checkpoint` falls back to if the job dies between the two renames):

* the trainer's own files (weights as safetensors, its state as JSON), written by ``write_main``
  on the main process; the trainer's *marker* file (written last by ``write_main``) says the
  checkpoint is complete;
* ``optimizer.pt``: the optimizer state (one copy; DDP replicates it), or, under DeepSpeed ZeRO,
  ``optimizer-rank{r}.pt``, each rank's own shard;
* ``rng.pt``: ``{"ranks": [state of rank 0, rank 1, ...]}``, each ``{"cpu": ..., "cuda": [...]}``.

Everything is read back with ``torch.load(weights_only=True)``; DeepSpeed's optimizer shards hold
three DeepSpeed classes (its loss scaler, ZeRO-stage enum and ZeRO-2's parameter-slice record),
which are allow-listed by name for that load only. Saving is a collective: every rank calls
:func:`save_checkpoint`, and the main process swaps ``.last.tmp`` in only after every rank has
written its files into it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pipeline_lib.train.distributed import (
    full_state_dict,
    gather_rng_states,
    is_deepspeed,
    load_full_weights,
)

log = logging.getLogger(__name__)


LAST, OLD, TMP = "last", "last.old", ".last.tmp"
MARKER = "state.json"  # the marker of save_trainer_checkpoint's layout


def find_checkpoint(directory: Path, marker: str) -> Path | None:
    """``last`` (or ``last.old`` when a save died between its two renames) if complete."""
    for name in (LAST, OLD):
        path = Path(directory) / name
        if (path / marker).exists():
            return path
    return None


def clear_stale(directory: Path) -> None:
    """Remove half-written ``.last.tmp*`` directories left by a killed save."""
    directory = Path(directory)
    if directory.exists():
        for stale in directory.glob(f"{TMP}*"):
            shutil.rmtree(stale, ignore_errors=True)


def save_checkpoint(acc, directory: Path, optimizer, write_main: Callable[[Path], None]) -> Path:
    """Write ``directory/last`` atomically; a collective (every rank calls it)."""
    directory = Path(directory)
    tmp, last, old = directory / TMP, directory / LAST, directory / OLD
    main = acc.is_main_process
    if main:
        directory.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        os.chmod(tmp, 0o755)
    acc.wait_for_everyone()  # .last.tmp exists
    rng = gather_rng_states(acc)
    if is_deepspeed(acc):
        torch.save(optimizer.state_dict(), tmp / f"optimizer-rank{acc.process_index}.pt")
    elif main:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    acc.wait_for_everyone()  # every rank's files are in .last.tmp before it is swapped in
    if main:
        try:
            torch.save({"ranks": rng}, tmp / "rng.pt")
            write_main(tmp)  # the trainer's files; its marker last
            if last.exists():
                if old.exists():
                    shutil.rmtree(old)
                os.replace(last, old)
            os.replace(tmp, last)
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    acc.wait_for_everyone()
    return last


def _deepspeed_safe_globals() -> list:
    """The DeepSpeed classes a ZeRO-2/3 optimizer shard pickles (loss scaler, ZeRO stage enum,
    ZeRO-2's parameter-slice records): allow-listed by name, nothing else."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_torch(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


def load_optimizer(acc, optimizer, path: Path) -> None:
    """Restore the optimizer saved by :func:`save_checkpoint` (this rank's shard under ZeRO)."""
    if is_deepspeed(acc):
        shard = path / f"optimizer-rank{acc.process_index}.pt"
        if not shard.exists():
            raise ValueError(f"checkpoint {path} has no DeepSpeed optimizer shard for rank "
                             f"{acc.process_index} (written with another launch config?)")
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            own = torch.load(shard, map_location="cpu", weights_only=True)
        # DeepSpeed's ZeRO optimizers take the list of every rank's state, indexed by rank, but
        # read only their own entry when the world size and layout are unchanged (as here: the
        # trainers refuse a checkpoint of another process count), so the others stay None
        # instead of costing each rank a full optimizer state of host memory.
        states: list[Any] = [None] * acc.num_processes
        states[acc.process_index] = own
        optimizer.optimizer.load_state_dict(states)
        return
    else:
        if not (path / "optimizer.pt").exists():
            raise ValueError(f"checkpoint {path} has no optimizer.pt (written with DeepSpeed?)")
        state = load_torch(path / "optimizer.pt")
    optimizer.load_state_dict(state)


def load_rng(acc, path: Path) -> None:
    """Restore this rank's torch RNG state (CUDA too when the device count matches)."""
    saved = load_torch(path / "rng.pt")["ranks"]
    if len(saved) != acc.num_processes:
        log.warning("checkpoint %s holds RNG states of %d processes, this run has %d; "
                    "RNG not restored", path, len(saved), acc.num_processes)
        return
    state = saved[acc.process_index]
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = list(state["cuda"])
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning("checkpoint has %d CUDA RNG states for %d devices; not restored",
                        len(cuda), torch.cuda.device_count())


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True))


def load_weights_dir(model, directory: Path) -> None:
    """Load ``save_pretrained`` safetensors (one file or shards) into ``model`` in place.

    Weights that ``save_pretrained`` leaves out must be tied to a loaded one; anything else
    missing, or any unexpected key, is an error naming the directory.
    """
    from safetensors.torch import load_file


    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"checkpoint {directory} has no *.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f), device="cpu"))
    load_full_weights(model, state, f"checkpoint {directory}")


def save_trainer_checkpoint(acc, directory: Path, model, optimizer, scheduler, meta: dict,
                            rows: list[dict], tokenizer=None) -> Path:
    """The layout the SFT, reward-model and preference trainers share: the weights
    (``save_pretrained``; gathered first under ZeRO-3), the tokenizer, ``scheduler.pt``,
    ``scaler.pt`` (fp16), ``log_rows.json`` and ``meta`` as the marker ``state.json``, plus
    :func:`save_checkpoint`'s optimizer and RNG files. A collective."""
    weights = full_state_dict(acc, model)
    unwrapped = acc.unwrap_model(model)

    def write_main(tmp: Path) -> None:
        unwrapped.save_pretrained(tmp, state_dict=weights)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if acc.scaler is not None:
            torch.save(acc.scaler.state_dict(), tmp / "scaler.pt")
        (tmp / "log_rows.json").write_text(json.dumps(rows))
        write_json(tmp / MARKER, meta)  # last: its presence marks a complete checkpoint

    path = save_checkpoint(acc, directory, optimizer, write_main)
    if acc.is_main_process:
        log.info("checkpoint at step %s saved in %s", meta.get("step"), path)
    return path


def read_trainer_checkpoint(directory: Path | None, expected: dict[str, Any]
                            ) -> tuple[Path | None, dict[str, Any], list[dict]]:
    """(path, state, log rows) of the complete checkpoint in ``directory``, or (None, {}, []).

    ``expected`` maps state keys to this run's values (seed, data size, processes, ...); a
    checkpoint that differs in any is refused with an error naming each difference.
    """
    path = find_checkpoint(directory, MARKER) if directory is not None else None
    if path is None:
        return None, {}, []
    state = json.loads((path / MARKER).read_text())
    changed = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
    if changed:
        raise ValueError(f"cannot resume from {path}: settings differ (checkpoint, now): "
                         f"{changed}; use a fresh checkpoint directory")
    return path, state, json.loads((path / "log_rows.json").read_text())


def load_trainer_state(acc, optimizer, scheduler, path: Path) -> None:
    """Restore what :func:`save_trainer_checkpoint` saved besides the weights and log rows
    (after ``acc.prepare``): optimizer (this rank's shard under ZeRO), scheduler, RNG, scaler."""
    load_optimizer(acc, optimizer, path)
    scheduler.load_state_dict(load_torch(path / "scheduler.pt"))
    load_rng(acc, path)
    if acc.scaler is not None and (path / "scaler.pt").exists():
        acc.scaler.load_state_dict(load_torch(path / "scaler.pt"))
