"""The torch device a job runs on, and seeding of every global random generator."""

from __future__ import annotations

import random

import numpy as np
import torch


def pick_device(requested: str = "auto") -> torch.device:
    """``auto`` → cuda when available, else cpu. Under ``accelerate launch`` (``LOCAL_RANK``
    set) a CUDA device is this process's own GPU, ``cuda:<LOCAL_RANK>``."""
    import os

    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    local_rank = os.environ.get("LOCAL_RANK")
    if requested == "cuda" and local_rank is not None:
        return torch.device(f"cuda:{int(local_rank)}")
    return torch.device(requested)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))  # noqa: NPY002 - seeds legacy global users (libraries)
    torch.manual_seed(seed)
