"""Sampling bookkeeping shared by the backends: parameters, prompt groups and shards (seeded per
group, so tables do not depend on the shard count), padding and EOS trimming."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline_lib.math.seeding import derive_seed


@dataclass(frozen=True)
class SamplingParams:
    """Temperature, top-p, top-k (0 = off) and the response length limit of a sampling call."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 32


@dataclass
class Response:
    """A sampled response: its token ids (cut after the first EOS) and whether it finished."""

    token_ids: list[int]  # generated ids, including the final EOS when finished
    finished: bool


def prompt_groups(n_prompts: int, m: int, batch_size: int) -> list[range]:
    """Fixed chunks of prompt indices such that each chunk has ~batch_size sequences."""
    per_group = max(1, batch_size // max(m, 1))
    return [range(s, min(s + per_group, n_prompts)) for s in range(0, n_prompts, per_group)]


def shard_groups(groups: Sequence[range], n_shards: int, shard: int) -> list[range]:
    """Contiguous share of the groups for ``shard`` in 0..n_shards-1."""
    if not 0 <= shard < n_shards:
        raise ValueError(f"shard {shard} out of range for {n_shards} shards")
    bounds = np.linspace(0, len(groups), n_shards + 1).round().astype(int)
    return list(groups[bounds[shard] : bounds[shard + 1]])


def pad_batch(
    seqs: Sequence[Sequence[int]], pad_id: int, left: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of shape (B, max len): right padding (positions 0..L-1, as in
    training and log-prob scoring) or left padding (for ``generate``)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        span = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, span] = torch.tensor(list(s), dtype=torch.long)
        attn[i, span] = 1
    return ids, attn


EosIds = int | Sequence[int] | None


def eos_set(eos_id: EosIds) -> frozenset[int]:
    """The EOS ids as a set (one id, several — chat models end a turn with any of them — or none)."""
    if eos_id is None:
        return frozenset()
    if isinstance(eos_id, int):
        return frozenset((eos_id,))
    return frozenset(int(e) for e in eos_id)


def trim_at_eos(ids: Sequence[int], eos_id: EosIds) -> list[int]:
    """Generated ids cut after the first EOS (kept; any of the ids given); unfinished responses
    are kept whole.

    ``generate`` pads a sequence only after its EOS, so every id before it, PAD included,
    was sampled and stays: the log-probs are then those of what was drawn."""
    ids, stop = list(ids), eos_set(eos_id)
    for i, t in enumerate(ids):
        if t in stop:
            return ids[: i + 1]
    return ids


def response_from_ids(ids: list[int], eos_id: EosIds) -> Response:
    """A :class:`Response` of generated ids: cut after the first EOS (kept), finished if it had one."""
    kept = trim_at_eos(ids, eos_id)
    return Response(kept, bool(kept) and kept[-1] in eos_set(eos_id))


def sample_groups(
    backend,
    prompt_ids: Sequence[Sequence[int]],
    groups: Sequence[range],
    m: int,
    params: SamplingParams,
    seed: int,
    split: str,
    progress: bool = True,
) -> dict[int, list[Response]]:
    """Sample ``m`` responses for every prompt in ``groups``; prompt index → responses."""
    result: dict[int, list[Response]] = {}
    bar = tqdm(total=sum(len(g) for g in groups), desc=f"sample {split}", unit="prompt",
               mininterval=2.0, disable=not progress)
    for g in groups:
        group_seed = derive_seed(seed, "sample", split, g.start)
        batch = backend.sample([prompt_ids[i] for i in g], m, params, group_seed)
        for i, responses in zip(g, batch, strict=True):
            result[i] = responses
        bar.update(len(g))
    bar.close()
    return result
