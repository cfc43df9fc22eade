"""Stage ``gather_samples``: concatenate the sample shards of a split."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import polars as pl

from pipeline_lib.io.atomic import PathLike
from pipeline_lib.io.tables import read_polars, read_provenance, write_table
from pipeline_lib.settings.sections import Settings
from pipeline_lib.stages.common import provenance
from pipeline_lib.stages.reward_cache import check_complete


def run_gather(
    config: Settings | Mapping[str, Any], split: str, shards: Sequence[PathLike], prompts_path: PathLike,
    out: PathLike,
) -> None:
    """Concatenate shards; check every prompt has samples 0..M-1 exactly once."""
    s = Settings.from_config(config)
    prompts = read_polars(prompts_path, "prompts")
    m = s.sampling.M.of(split)
    table = pl.concat([read_polars(s, "samples") for s in shards])
    check_complete(table, prompts["prompt_id"].to_list(), m, f"{split} shards {list(shards)}")
    order = {p: i for i, p in enumerate(prompts["prompt_id"].to_list())}
    table = (table.with_columns(pl.col("prompt_id").replace_strict(order).alias("_o"))
             .sort("_o", "sample_idx").drop("_o"))
    # the models the shards were sampled with (the same in every shard)
    models = {k: v for path in shards for k, v in read_provenance(path).get("models", {}).items()}
    write_table(table, out, "samples", provenance(s, "gather", split=split, M=m,
                                                  shards=len(shards),
                                                  **({"sampled_with": models} if models else {})))
