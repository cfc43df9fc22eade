"""Deterministic seeds derived from the config seed and a path of names."""

from __future__ import annotations

import hashlib


def derive_seed(seed: int, *parts: object) -> int:
    """A 31-bit seed from the base seed and any labels (stage, split, shard, ...).

    Stable across processes and Python versions (sha256, not ``hash()``), so a prompt group
    gets the same seed whichever shard or machine generates it.
    """
    key = "/".join([str(int(seed)), *map(str, parts)]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "little") & 0x7FFFFFFF
