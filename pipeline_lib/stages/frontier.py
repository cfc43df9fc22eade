"""Stage ``frontier``: each method sweep's gold reward and win rate on the BoN points' KL grid,
with bootstrap confidence intervals over test prompts and training seeds, and the gap to BoN.

A *sweep* is the runs of one ``methods`` entry (:attr:`MethodRun.sweep`): one point per value
of its swept knob, each trained with the same seeds. Per run and seed the per-prompt values come
from its evaluation samples (``eval/policy-<run>.parquet``): the k1 KL (mean of ``log π - log
π_ref`` over the prompt's K samples), the mean gold, and the win rate against the test cache's
held-out judges. BoN's per-prompt values at each n of the grid come from the test cache: the
gold of the proxy-best of n (the unbiased estimator, over all M samples, the configured
objective) and its win rate against the same judges (best of n from the other samples). The grid
is BoN's analytic KL ``log n - (n-1)/n`` at each n of ``evaluation.bon_ns`` for which both are
defined. Interpolation and bootstrap: :mod:`pipeline_lib.math.frontier`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import polars as pl

from pipeline_lib.io.schemas import SCHEMAS
from pipeline_lib.io.tables import read_polars, write_table
from pipeline_lib.math.bon import bon_curve, bon_kl
from pipeline_lib.math.frontier import KL_ANALYTIC_BON, KL_K1, bootstrap_frontier
from pipeline_lib.math.seeding import derive_seed
from pipeline_lib.math.winrate import bon_win_rate, win_rate_per_prompt
from pipeline_lib.settings.methods import MethodRun
from pipeline_lib.settings.sections import Settings
from pipeline_lib.stages.bon_curve import held_out_judges
from pipeline_lib.stages.common import PathLike, StageError, provenance
from pipeline_lib.stages.reward_cache import (
    cache_matrices,
    configured_objective_name,
    normaliser_stats,
    objective_matrices,
    uwo_curve_lambdas,
)

log = logging.getLogger("pipeline")

METRICS = ("gold", "win_rate")
N_BOOT = 1000
LEVEL = 0.95


def sweep_points(runs: Mapping[str, MethodRun]) -> dict[str, list[list[str]]]:
    """Sweep name -> its points in knob order, each point the run names of its seeds (sorted by
    seed). Every point of a sweep must have the same number of seeds."""
    by_sweep: dict[str, dict[Any, list[MethodRun]]] = {}
    for run in runs.values():
        by_sweep.setdefault(run.sweep, {}).setdefault(run.base_name, []).append(run)
    out: dict[str, list[list[str]]] = {}
    for sweep, points in by_sweep.items():
        ordered = sorted(points.values(), key=lambda rs: _knob_key(rs[0]))
        sizes = {len(rs) for rs in ordered}
        if len(sizes) != 1:
            raise StageError(f"sweep {sweep!r}: its points have different numbers of training "
                             f"seeds ({sorted(sizes)}); give the entry one `seeds` list")
        out[sweep] = [[r.name for r in sorted(rs, key=lambda r: (r.seed is None, r.seed))]
                      for rs in ordered]
    return out


def _knob_key(run: MethodRun) -> tuple:
    value = run.knob_value
    values = value if isinstance(value, tuple) else (value,)
    return tuple((v is None, str(type(v)), v if v is not None else 0) for v in values)


def policy_per_prompt(samples: pl.DataFrame, prompt_ids: list[str], judges: np.ndarray,
                      where: str) -> dict[str, np.ndarray]:
    """Per-prompt k1 KL, mean gold and win rate against ``judges`` (``(P, J)``, rows in
    ``prompt_ids`` order) of one policy's evaluation samples."""
    s = samples.sort("prompt_id", "sample_idx")
    if sorted(set(s["prompt_id"].to_list())) != list(prompt_ids):
        raise StageError(f"{where}: its prompts differ from the test cache's")
    k = s.height // len(prompt_ids)
    if k * len(prompt_ids) != s.height:
        raise StageError(f"{where}: prompts have different numbers of samples")
    gold = s["gold"].to_numpy().reshape(len(prompt_ids), k)
    k1 = (s["logp_policy"].to_numpy() - s["logp_ref"].to_numpy()).reshape(len(prompt_ids), k)
    return {"kl": k1.mean(axis=1), "gold": gold.mean(axis=1),
            "win_rate": win_rate_per_prompt(gold, judges)}


def bon_per_prompt(proxy: np.ndarray, gold: np.ndarray, judges: int,
                   ns: list[int]) -> dict[str, np.ndarray]:
    """``(N, P)`` per-prompt gold of the proxy-best of n (over all M samples) and its win rate
    against the first ``judges`` samples (best of n from the others)."""
    p = gold.shape[0]
    gold_n = np.empty((len(ns), p))
    win_n = np.empty((len(ns), p))
    for i in range(p):
        gold_n[:, i] = bon_curve(proxy[i:i + 1], gold[i:i + 1], ns)[1]
        for a, n in enumerate(ns):
            win_n[a, i] = bon_win_rate(proxy[i:i + 1, judges:], gold[i:i + 1, judges:],
                                       gold[i:i + 1, :judges], n)
    return {"gold": gold_n, "win_rate": win_n}


def frontier_table(s: Settings, evals: Mapping[str, PathLike], test_rewards: PathLike,
                   train_rewards: PathLike | None) -> pl.DataFrame:
    """One row per (sweep, metric, grid KL): see the module docstring and the ``frontier``
    schema."""
    rewards = read_polars(test_rewards, "rewards")
    prompt_ids, gold, names, members = cache_matrices(rewards, str(test_rewards))
    lambdas = uwo_curve_lambdas(s.cdf, s.evaluation.uwo_lambdas)
    proxy = objective_matrices(members, names, lambdas, normaliser_stats(s.cdf, train_rewards))[
        configured_objective_name(s.cdf, lambdas)]
    m = gold.shape[1]
    j = held_out_judges(s, m, str(test_rewards))
    ns = sorted({n for n in s.evaluation.bon_ns if n <= m - j})
    bon = bon_per_prompt(proxy, gold, j, ns)
    bon_kl_grid = np.asarray(bon_kl(np.asarray(ns, dtype=float)), dtype=float)
    frames = []
    for sweep, points in sweep_points(s.methods).items():
        per = [[policy_per_prompt(read_polars(evals[name], "eval_samples"), prompt_ids,
                                  gold[:, :j], str(evals[name])) for name in seeds]
               for seeds in points]
        stack = {key: np.array([[d[key] for d in seeds] for seeds in per])
                 for key in ("kl", *METRICS)}
        ci = bootstrap_frontier(stack["kl"], {k: stack[k] for k in METRICS}, bon_kl_grid,
                                bon, n_boot=N_BOOT, level=LEVEL,
                                rng=derive_seed(s.seed, "frontier", sweep),
                                kl_estimator=KL_K1, bon_kl_estimator=KL_ANALYTIC_BON)
        cols = ci.to_columns()
        first = s.methods[points[0][0]]
        frame = pl.DataFrame({
            "sweep": [sweep] * len(cols["metric"]),
            "method": [first.method] * len(cols["metric"]),
            "knob": [first.knob] * len(cols["metric"]),
            "n_points": [len(points)] * len(cols["metric"]),
            "n_seeds": [len(points[0])] * len(cols["metric"]),
            "bon_n": [ns[i] for i in cols["grid_index"]],
            **{k: v.tolist() for k, v in cols.items() if k != "grid_index"},
        })
        frames.append(frame.with_columns(pl.col(pl.Float64).fill_nan(None)))
        log.info("frontier %s: %d points x %d seeds", sweep, len(points), len(points[0]))
    if not frames:  # no method run
        return pl.from_arrow(SCHEMAS["frontier"].empty_table())
    return pl.concat(frames)


def run_frontier(config: Settings | Mapping[str, Any], evals: Mapping[str, PathLike],
                 test_rewards: PathLike, train_rewards: PathLike | None, out: PathLike) -> None:
    """frontier.parquet (see :func:`frontier_table`)."""
    s = Settings.from_config(config)
    table = frontier_table(s, evals, test_rewards, train_rewards)
    write_table(table, out, "frontier",
                provenance(s, "frontier", n_boot=N_BOOT, level=LEVEL))
