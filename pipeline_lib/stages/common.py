"""What every stage shares: the error naming a file, job set-up (threads, seed, device),
provenance metadata, and running a training job in this process or under ``accelerate launch``."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from pipeline_lib import __version__
from pipeline_lib.io.atomic import PathLike
from pipeline_lib.io.guard import checkpoint_guard
from pipeline_lib.math.seeding import derive_seed
from pipeline_lib.models.device import pick_device, seed_everything
from pipeline_lib.models.hub import loaded_models
from pipeline_lib.settings.config import config_hash
from pipeline_lib.settings.sections import Settings
from pipeline_lib.train.launch import run_launched

# The module ``accelerate launch`` runs in every process of a launched training job.
LAUNCH_ENTRY = "pipeline_lib.stages.jobs"


class StageError(RuntimeError):
    """A stage's inputs are inconsistent (message names the file and what is wrong)."""


def provenance(s: Settings, stage: str, **extra: Any) -> dict[str, Any]:
    """The metadata every table carries: stage, config hash, seed, task, version, ``models``
    (each model this process loaded: config key -> name, revision and snapshot, the hub commit
    hash or a local directory's fingerprint; only when any was loaded) and ``extra``."""
    models = loaded_models()
    return {
        "stage": stage,
        "config_hash": config_hash(s.source),
        "seed": s.seed,
        "task": s.task,
        "pipeline_version": __version__,
        **({"models": models} if models else {}),
        **{k: str(v) if isinstance(v, Path) else v for k, v in extra.items()},
    }


def setup_job(s: Settings, threads: int | None, *seed_parts: object) -> torch.device:
    """Set torch's threads, seed every generator from the config seed and ``seed_parts``, and
    return the job's device."""
    if threads:
        torch.set_num_threads(int(threads))
    seed_everything(derive_seed(s.seed, *seed_parts))
    return pick_device(s.device)


def is_main_process() -> bool:
    """False only in the non-main ranks of an ``accelerate launch`` (they write nothing)."""
    from accelerate import PartialState

    return PartialState().is_main_process


def dispatch_training_job(stage: str, job: Callable[..., None], s: Settings, threads: int | None,
                          workdir: PathLike, **kwargs: Any) -> None:
    """Run a training job (``job``, registered as ``stage`` in :mod:`pipeline_lib.stages.jobs`)
    in this process, or, with ``training.launch.accelerate_config`` set, in
    ``training.launch.num_processes`` processes under ``accelerate launch``."""
    kwargs = {k: (str(v) if isinstance(v, Path) else v) for k, v in kwargs.items()}
    if s.training.launch.accelerate_config is None:
        job(s, threads=threads, **kwargs)
    else:

        run_launched(stage, LAUNCH_ENTRY, s.source, s.training.launch, s.device, kwargs,
                     threads, workdir=Path(workdir))


def training_checkpoint(
    s: Settings, checkpoint_dir: PathLike | None, sections: Sequence[str],
    inputs: Sequence[PathLike | None], **extra: Any,
) -> Path | None:
    """The SFT / reward-model job's checkpoint directory, guarded by its config sections and
    inputs (:func:`checkpoint_guard`); None without one."""
    if checkpoint_dir is None:
        return None
    ckpt = Path(checkpoint_dir)
    settings = {k: s.source[k] for k in ("seed", "device", *sections)}
    checkpoint_guard(ckpt, {**settings, "launch": s.source["training"]["launch"], **extra},
                     inputs)
    return ckpt


def remove_checkpoint(ckpt: Path | None) -> None:
    """The job is complete (outputs written): a rerun starts afresh."""
    if ckpt is not None:
        shutil.rmtree(ckpt, ignore_errors=True)


def launch_info(s: Settings) -> dict[str, Any]:
    """Provenance of how a training job ran."""
    from accelerate import PartialState

    return {"processes": PartialState().num_processes,
            "accelerate_config": s.training.launch.accelerate_config}

