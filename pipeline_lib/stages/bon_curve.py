"""Stage ``bon_curve``: BoN curves on the test cache for every objective and n."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import polars as pl

from pipeline_lib.io.tables import read_polars, write_table
from pipeline_lib.math.bon import bon_curve, bon_kl, bon_kl_ties_batch
from pipeline_lib.math.winrate import bon_win_rates
from pipeline_lib.settings.sections import Settings
from pipeline_lib.stages.common import PathLike, StageError, provenance
from pipeline_lib.stages.reward_cache import (
    cache_matrices,
    normaliser_stats,
    objective_matrices,
    uwo_curve_lambdas,
)

log = logging.getLogger("pipeline")


def held_out_judges(s: Settings, m: int, where: str) -> int:
    """``J``, the held-out judges of a test cache of ``m`` samples per prompt: its columns
    ``[:J]`` (the first ``J`` by sample_idx) judge every ``win_rate_ref`` (policies and BoN
    points); the BoN points' win rates select from columns ``[J:]``."""
    j = s.evaluation.judges(m)
    if not 1 <= j < m:
        raise StageError(
            f"{where}: evaluation.win_rate_judges ({j}) must be below the cache's M ({m}) "
            "samples per prompt: the judges are held out of the BoN pool")
    return j


def _bon_win_rates(pool_score, pool_gold, judges, ns: list[int]) -> list[float | None]:
    """``bon_win_rate`` at each n of ``ns`` (sorted), None where n exceeds the pool."""
    fits = [n for n in ns if n <= pool_score.shape[1]]
    rates = bon_win_rates(pool_score, pool_gold, judges, fits).tolist() if fits else []
    return rates + [None] * (len(ns) - len(fits))


def run_bon_curve(config: Settings | Mapping[str, Any], rewards_path: PathLike,
                  train_rewards: PathLike | None, out: PathLike) -> None:
    """BoN curves on the test cache for every selection objective and n on the grid.

    proxy, gold and the KLs use all M samples per prompt; ``win_rate_ref`` selects best-of-n
    from the M - J samples that are not held-out judges and judges it against the J judges
    (:func:`held_out_judges`), as every policy's ``win_rate_ref`` is (null when n > M - J)."""
    s = Settings.from_config(config)
    rewards = read_polars(rewards_path, "rewards")
    prompt_ids, gold, names, members = cache_matrices(rewards, str(rewards_path))
    p, m = gold.shape
    j = held_out_judges(s, m, str(rewards_path))
    judges, pool_gold = gold[:, :j], gold[:, j:]
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
            "win_rate_ref": _bon_win_rates(score[:, j:], pool_gold, judges, ns),
            "win_rate_judges": [j] * len(ns),
            "n_prompts": [p] * len(ns),
            "pool_size": [m] * len(ns),
        }, schema_overrides={"win_rate_ref": pl.Float64}))
        log.info("bon curve %s: gold %s", obj, np.round(gold_curve, 4).tolist())
    write_table(pl.concat(frames), out, "bon_curve",
                provenance(s, "bon_curve", ns=ns, M=m, prompts=len(prompt_ids), judges=j))
