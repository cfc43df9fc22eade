"""Stage ``gather_samples``: concatenate the sample shards of a split."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import polars as pl

from pipeline_lib.io.atomic import PathLike
from pipeline_lib.io.tables import (
    iter_table_parts,
    read_polars,
    read_provenance,
    table_writer,
    write_table,
)
from pipeline_lib.settings.sections import Settings
from pipeline_lib.stages.common import provenance
from pipeline_lib.stages.reward_cache import check_complete

log = logging.getLogger("pipeline")


def run_gather(
    config: Settings | Mapping[str, Any], split: str, shards: Sequence[PathLike], prompts_path: PathLike,
    out: PathLike,
) -> None:
    """Concatenate shards; check every prompt has samples 0..M-1 exactly once.

    Shards in prompt order (as ``sample`` writes them) are copied row group by row group, so
    memory holds one row group, not the split; otherwise they are read whole and sorted."""
    s = Settings.from_config(config)
    prompts = read_polars(prompts_path, "prompts")
    m = s.sampling.M.of(split)
    ids = prompts["prompt_id"].to_list()
    # the models the shards were sampled with (the same in every shard)
    models = {k: v for path in shards for k, v in read_provenance(path).get("models", {}).items()}
    prov = provenance(s, "gather", split=split, M=m, shards=len(shards),
                      **({"sampled_with": models} if models else {}))
    where = f"{split} shards {list(shards)}"
    try:
        _gather_in_order(shards, ids, m, out, prov)
    except _NotInOrder as exc:
        log.info("%s: %s; gathering in memory", where, exc)
        _gather_in_memory(shards, ids, m, out, prov, where)


class _NotInOrder(Exception):
    """The shards' rows are not (prompt order, sample_idx 0..M-1), each exactly once."""


def _gather_in_order(shards: Sequence[PathLike], ids: list[str], m: int, out: PathLike,
                     prov: Mapping[str, Any]) -> None:
    """Copy the shards' row groups in order, checking that row r is (ids[r // m], r % m)."""
    expected_ids = np.array(ids, dtype=object)
    rows = 0
    with table_writer(out, "samples", prov) as writer:
        for path in shards:
            for part in iter_table_parts(path, "samples"):
                r = np.arange(rows, rows + part.num_rows)
                if r.size and r[-1] >= len(ids) * m:
                    raise _NotInOrder("more rows than prompts x M")
                got_ids = np.array(part.column("prompt_id").to_pylist(), dtype=object)
                got_idx = part.column("sample_idx").to_numpy()
                if not (np.array_equal(got_ids, expected_ids[r // m])
                        and np.array_equal(got_idx, r % m)):
                    raise _NotInOrder(f"{path} is not in prompt order")
                writer.write(part)
                rows += part.num_rows
        if rows != len(ids) * m:
            raise _NotInOrder(f"{rows} rows, expected {len(ids) * m}")


def _gather_in_memory(shards: Sequence[PathLike], ids: list[str], m: int, out: PathLike,
                      prov: Mapping[str, Any], where: str) -> None:
    table = pl.concat([read_polars(s, "samples") for s in shards])
    check_complete(table, ids, m, where)
    order = {p: i for i, p in enumerate(ids)}
    table = (table.with_columns(pl.col("prompt_id").replace_strict(order).alias("_o"))
             .sort("_o", "sample_idx").drop("_o"))
    write_table(table, out, "samples", prov)
