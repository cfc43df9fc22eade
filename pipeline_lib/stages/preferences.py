"""Stage ``preferences``: gold-labelled pairs of SFT samples (with label noise)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import polars as pl

from pipeline_lib.io.atomic import PathLike
from pipeline_lib.io.tables import read_polars, write_table
from pipeline_lib.math.seeding import derive_seed
from pipeline_lib.models.scorers import gold_scorer
from pipeline_lib.settings.sections import Settings
from pipeline_lib.stages.common import StageError, provenance, setup_job
from pipeline_lib.stages.generate import generate_table, make_backend

log = logging.getLogger("pipeline")


def run_preferences(
    config: Settings | Mapping[str, Any], policy_dir: PathLike, prompts_path: PathLike, out: PathLike,
    threads: int | None = None,
) -> None:
    """Sample responses from the SFT policy, label pairs with the gold scorer (+ noise)."""
    s = Settings.from_config(config)
    device = setup_job(s, threads, "preferences")
    prompts = read_polars(prompts_path, "prompts")
    k = s.preferences.samples_per_prompt
    backend = make_backend(s, policy_dir, device)
    samples = generate_table(backend, prompts, None, k, s.generation, s.seed, "pref")
    gold = gold_scorer(s.gold, device)
    samples = samples.with_columns(pl.Series(
        "gold", gold.score(samples["prompt"].to_list(), samples["response"].to_list())))
    rng = np.random.default_rng(derive_seed(s.seed, "preference-pairs"))
    rows = []
    for (pid,), grp in samples.group_by(["prompt_id"], maintain_order=True):
        g = grp["gold"].to_numpy()
        candidates = [(a, b) for a in range(len(g)) for b in range(a + 1, len(g)) if g[a] != g[b]]
        if not candidates:
            continue  # every response ties under the gold scorer: no preference signal
        a, b = candidates[rng.integers(len(candidates))]
        w, lo = (a, b) if g[a] > g[b] else (b, a)
        rows.append(dict(prompt_id=pid, prompt=grp["prompt"][0],
                         chosen=grp["response"][w], rejected=grp["response"][lo],
                         chosen_gold=float(g[w]), rejected_gold=float(g[lo])))
    if not rows:
        raise StageError(f"{prompts_path}: no prompt produced two responses with different gold "
                         "rewards; cannot build preference pairs")
    noise = s.preferences.label_noise
    flip = rng.random(len(rows)) < noise
    for row, f in zip(rows, flip, strict=True):
        row["flipped"] = bool(f)
        if f:
            row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
            row["chosen_gold"], row["rejected_gold"] = row["rejected_gold"], row["chosen_gold"]
    log.info("%d preference pairs from %d prompts (%d dropped as gold ties, %d flipped)",
             len(rows), prompts.height, prompts.height - len(rows), int(flip.sum()))
    frame = pl.DataFrame(rows).with_columns(pl.int_range(pl.len(), dtype=pl.Int32).alias("pair_id"))
    write_table(frame, out, "preferences",
                provenance(s, "preferences", policy=policy_dir, label_noise=noise))
