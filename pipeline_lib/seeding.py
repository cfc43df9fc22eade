"""Deterministic seeds derived from the config seed and a stage's identity."""

from __future__ import annotations

import hashlib
import random

import numpy as np


def derive_seed(seed: int, *parts: object) -> int:
    """A 31-bit seed from the base seed and any labels (stage, split, shard, ...).

    Stable across processes and Python versions (sha256, not ``hash()``), so a prompt group
    gets the same seed whichever shard or machine generates it.
    """
    key = "/".join([str(int(seed)), *map(str, parts)]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "little") & 0x7FFFFFFF


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))  # noqa: NPY002 - seeds legacy global users (libraries)
    torch.manual_seed(seed)
