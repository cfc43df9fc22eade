"""Stage ``bon_curve``: BoN curves on the test cache for every objective and n."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import polars as pl

from pipeline_lib.io.tables import read_polars, write_table
from pipeline_lib.math.bon import bon_curve, bon_kl, bon_kl_ties_batch
from pipeline_lib.math.winrate import win_rate_vs_bon
from pipeline_lib.settings.sections import Settings
from pipeline_lib.stages.common import PathLike, provenance
from pipeline_lib.stages.reward_cache import (
    cache_matrices,
    normaliser_stats,
    objective_matrices,
    uwo_curve_lambdas,
)

log = logging.getLogger("pipeline")


def run_bon_curve(config: Settings | Mapping[str, Any], rewards_path: PathLike,
                  train_rewards: PathLike | None, out: PathLike) -> None:
    """BoN curves on the test cache for every selection objective and n on the grid."""
    s = Settings.from_config(config)
    rewards = read_polars(rewards_path, "rewards")
    prompt_ids, gold, names, members = cache_matrices(rewards, str(rewards_path))
    p, m = gold.shape
    ns = sorted({n for n in s.evaluation.bon_ns if n <= m})
    frames = []
    lambdas = uwo_curve_lambdas(s.cdf, s.evaluation.uwo_lambdas)
    for obj, score in objective_matrices(members, names, lambdas,
                                         normaliser_stats(s.cdf, train_rewards)).items():
        proxy_curve, gold_curve = bon_curve(score, gold, ns)
        frames.append(pl.DataFrame({
            "objective": [obj] * len(ns),
            "n": ns,
            "proxy": proxy_curve,
            "gold": gold_curve,
            "kl_analytic": [float(bon_kl(n)) for n in ns],
            "kl_ties": bon_kl_ties_batch(score, ns),
            "win_rate_ref": [1.0 - win_rate_vs_bon(gold, score, gold, n) for n in ns],
            "n_prompts": [p] * len(ns),
            "pool_size": [m] * len(ns),
        }))
        log.info("bon curve %s: gold %s", obj, np.round(gold_curve, 4).tolist())
    write_table(pl.concat(frames), out, "bon_curve",
                provenance(s, "bon_curve", ns=ns, M=m, prompts=len(prompt_ids)))
