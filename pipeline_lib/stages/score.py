"""Stage ``score``: the reward cache (gold and every proxy on every cached sample)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import polars as pl

from pipeline_lib.io.atomic import PathLike
from pipeline_lib.io.tables import read_polars, write_table
from pipeline_lib.models.scorers import gold_scorer, reward_model_scorer
from pipeline_lib.settings.sections import Settings
from pipeline_lib.stages.common import provenance, setup_job

log = logging.getLogger("pipeline")


def run_score(
    config: Settings | Mapping[str, Any], split: str, samples_path: PathLike,
    reward_models: Mapping[str, PathLike], out: PathLike, threads: int | None = None,
) -> None:
    """Score every cached sample with the gold scorer and every proxy reward model."""
    s = Settings.from_config(config)
    device = setup_job(s, threads, "score", split)
    samples = read_polars(samples_path, "samples")
    texts = [p + r for p, r in zip(samples["prompt"], samples["response"], strict=True)]
    scorers = [gold_scorer(s.gold, device)]
    bs = s.scoring.batch_size
    scorers += [reward_model_scorer(path, name, device, batch_size=bs)
                for name, path in reward_models.items()]
    frames = []
    for scorer in scorers:
        values = scorer.score(texts)
        log.info("%s on %s: mean %.4f sd %.4f", scorer.name, split, values.mean(), values.std())
        frames.append(samples.select("prompt_id", "sample_idx").with_columns(
            pl.lit(scorer.name).alias("scorer"), pl.lit(scorer.kind).alias("kind"),
            pl.Series("reward", values)))
    write_table(pl.concat(frames), out, "rewards",
                provenance(s, "score", split=split, gold=s.gold.type,
                           reward_models={k: str(v) for k, v in reward_models.items()}))
