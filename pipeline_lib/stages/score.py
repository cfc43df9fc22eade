"""Stage ``score``: the reward cache (gold and every proxy on every cached sample)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import polars as pl

from pipeline_lib.io.atomic import PathLike
from pipeline_lib.io.tables import read_polars, write_table
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
    samples = read_polars(samples_path, "samples")
    prompts, responses = samples["prompt"].to_list(), samples["response"].to_list()
    members = member_settings(s.reward_models, reward_models)
    frames = []
    for scorer in _scorers(s, members, device):
        values = scorer.score(prompts, responses)
        log.info("%s on %s: mean %.4f sd %.4f", scorer.name, split, values.mean(), values.std())
        frames.append(samples.select("prompt_id", "sample_idx").with_columns(
            pl.lit(scorer.name).alias("scorer"), pl.lit(scorer.kind).alias("kind"),
            pl.Series("reward", values)))
    write_table(pl.concat(frames), out, "rewards",
                provenance(s, "score", split=split, gold=s.gold.type,
                           **({"gold_model": s.gold.model} if s.gold.type == "hf" else {}),
                           reward_models={m.name: m.model for m in members}))


def _scorers(s: Settings, members: Sequence[ScorerSettings], device) -> Iterator:
    """The gold scorer, then each proxy member, loaded one after the other."""
    yield gold_scorer(s.gold, device)
    for m in members:
        yield reward_model_scorer(m, device, batch_size=s.scoring.batch_size)
