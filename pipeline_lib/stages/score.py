"""Stage ``score``: the reward cache (gold and every proxy on every cached sample)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline_lib.io.atomic import PathLike
from pipeline_lib.io.tables import iter_table_parts, table_writer
from pipeline_lib.models.scorers import gold_scorer, member_settings, reward_model_scorer
from pipeline_lib.settings.sections import ScorerSettings, Settings
from pipeline_lib.stages.common import provenance, setup_job

log = logging.getLogger("pipeline")


def run_score(
    config: Settings | Mapping[str, Any], split: str, samples_path: PathLike,
    reward_models: Mapping[str, PathLike], out: PathLike, threads: int | None = None,
) -> None:
    """Score every cached (prompt, response) with the gold scorer and every proxy member: the
    trained seeds in ``reward_models`` (member name -> directory) and the pretrained reward
    models of ``reward_models.pretrained`` (members rm-<name>)."""
    s = Settings.from_config(config)
    device = setup_job(s, threads, "score", split)
    members = member_settings(s.reward_models, reward_models)
    prov = provenance(s, "score", split=split, gold=s.gold.type,
                      **({"gold_model": s.gold.model} if s.gold.type == "hf" else {}),
                      reward_models={m.name: m.model for m in members})
    # one scorer at a time over the samples, read in parts: memory holds one part of texts and
    # rewards, not the split; rows keep today's order (scorer, then sample)
    with table_writer(out, "rewards", prov) as writer:
        for scorer in _scorers(s, members, device):
            total = total_sq = 0.0
            count = 0
            for part in iter_table_parts(samples_path, "samples", SCORED_COLUMNS,
                                         rows=score_part_rows(scorer)):
                values = scorer.score(part.column("prompt").to_pylist(),
                                      part.column("response").to_pylist())
                writer.write(pa.table({
                    "prompt_id": part.column("prompt_id"), "sample_idx": part.column("sample_idx"),
                    "scorer": [scorer.name] * len(values), "kind": [scorer.kind] * len(values),
                    "reward": values}))
                total, total_sq = total + values.sum(), total_sq + (values ** 2).sum()
                count += len(values)
            mean = total / max(count, 1)
            log.info("%s on %s: mean %.4f sd %.4f", scorer.name, split, mean,
                     np.sqrt(max(total_sq / max(count, 1) - mean ** 2, 0.0)))


SCORED_COLUMNS = ("prompt_id", "sample_idx", "prompt", "response")
SCORE_PART_ROWS = 1 << 16  # about this many texts per part


def score_part_rows(scorer) -> int:
    """Rows per part for ``scorer``: a multiple of its batch size, so its batches (and the
    padding inside them) are those of scoring the split whole."""
    batch = int(getattr(scorer, "batch_size", 1) or 1)
    return batch * max(1, SCORE_PART_ROWS // batch)


def _scorers(s: Settings, members: Sequence[ScorerSettings], device) -> Iterator:
    """The gold scorer, then each proxy member, loaded one after the other."""
    yield gold_scorer(s.gold, device)
    for m in members:
        yield reward_model_scorer(m, device, batch_size=s.scoring.batch_size)
