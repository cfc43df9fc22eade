"""Stage ``sample``: M reference samples for one shard of a split's prompts."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import polars as pl

from pipeline_lib.generation.sampling import (
    prompt_groups,
    shard_groups,
)
from pipeline_lib.io.atomic import PathLike
from pipeline_lib.io.tables import read_polars, table_writer, write_table
from pipeline_lib.settings.sections import Settings
from pipeline_lib.stages.common import provenance, setup_job
from pipeline_lib.stages.generate import generate_parts, make_backend, prs_cache_table
from pipeline_lib.stages.reward_cache import load_proxy


def shard_group_starts(n_prompts: int, m: int, batch_size: int, shards: int,
                       shard: int) -> list[int]:
    """First prompt index of each prompt group in shard ``shard`` of ``shards``."""
    groups = prompt_groups(n_prompts, m, batch_size)
    return [g.start for g in shard_groups(groups, shards, shard)]


def run_sample_shard(
    config: Settings | Mapping[str, Any],
    split: str,
    shard: int,
    policy_dir: PathLike,
    prompts_path: PathLike,
    out: PathLike,
    threads: int | None = None,
    reward_models: Mapping[str, PathLike] | None = None,
) -> None:
    """Sample M responses for one shard of a split's prompts (groups are seeded globally).

    With ``sampling.strategy: prs`` each prompt gets a PRS tree of M samples instead, guided
    by the proxy ensemble (``reward_models``)."""
    s = Settings.from_config(config)
    device = setup_job(s, threads, "sample", split, shard)
    prompts = read_polars(prompts_path, "prompts")
    m = s.sampling.M.of(split)
    starts = shard_group_starts(prompts.height, m, s.generation.batch_size, s.sampling.shards,
                                shard)
    backend = make_backend(s, policy_dir, device)
    strategy = s.sampling.strategy
    prov = provenance(s, "sample", split=split, shard=shard, policy=policy_dir, M=m,
                      strategy=strategy)
    if strategy == "prs":
        table = _prs_shard(s, backend, prompts, starts, m, split, reward_models, device)
        write_table(table, out, "samples", prov)
        return
    # random samples: written part by part as they are drawn, so memory does not grow with
    # the shard; a killed shard leaves no table and its rerun draws the same samples
    with table_writer(out, "samples", prov) as writer:
        for part in generate_parts(backend, prompts, starts, m, s.generation, s.seed, split):
            writer.write(part)


def _prs_shard(s: Settings, backend, prompts, starts, m, split, reward_models, device):
    """PRS trees for the shard's prompt groups, guided by the (un-normalised) proxy ensemble;
    each group is seeded on its own, so the table does not depend on the shard count."""
    proxy = load_proxy(dataclasses.replace(s.cdf, normalize=False), s.reward_models,
                       s.scoring.batch_size, reward_models or {}, None, device)
    groups = prompt_groups(prompts.height, m, s.generation.batch_size)
    frames = [prs_cache_table(backend, prompts[g.start : g.stop], m, s, f"{split}/{g.start}",
                              proxy.score) for g in groups if g.start in set(starts)]
    return pl.concat(frames)
