"""Stage ``bon_curve``: BoN curves on the test cache for every objective and n."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import polars as pl

from pipeline_lib.io.tables import distinct_values, read_rows_where, write_table
from pipeline_lib.math.bon import bon_curve, bon_kl, bon_kl_ties_batch
from pipeline_lib.math.winrate import beat_fraction, bon_win_rates_of_beats
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


def _bon_win_rates(pool_score, beats, ns: list[int]) -> list[float | None]:
    """``bon_win_rate`` at each n of ``ns`` (sorted), None where n exceeds the pool; ``beats``:
    the pool's ``beat_fraction`` against the judges."""
    fits = [n for n in ns if n <= pool_score.shape[1]]
    rates = bon_win_rates_of_beats(pool_score, beats, fits).tolist() if fits else []
    return rates + [None] * (len(ns) - len(fits))


BON_CHUNK_PROMPTS = 32  # prompts read and reduced at a time


def run_bon_curve(config: Settings | Mapping[str, Any], rewards_path: PathLike,
                  train_rewards: PathLike | None, out: PathLike) -> None:
    """BoN curves on the test cache for every selection objective and n on the grid.

    proxy, gold and the KLs use all M samples per prompt; ``win_rate_ref`` selects best-of-n
    from the M - J samples that are not held-out judges and judges it against the J judges
    (:func:`held_out_judges`), as every policy's ``win_rate_ref`` is (null when n > M - J).
    Every value is a mean over prompts, so the cache is read and reduced BON_CHUNK_PROMPTS
    prompts at a time (memory holds one chunk) and the chunks' means are averaged, weighted by
    their prompts."""
    s = Settings.from_config(config)
    where = str(rewards_path)
    prompt_ids = sorted(distinct_values(rewards_path, "rewards", "prompt_id"))
    if not prompt_ids:
        raise StageError(f"{where}: the reward cache is empty")
    stats = normaliser_stats(s.cdf, train_rewards)
    lambdas = uwo_curve_lambdas(s.cdf, s.evaluation.uwo_lambdas)
    chunks: list[tuple[int, dict[str, dict[str, list]]]] = []
    m = j = ns = None
    for start in range(0, len(prompt_ids), BON_CHUNK_PROMPTS):
        rewards = pl.from_arrow(read_rows_where(rewards_path, "rewards", "prompt_id",
                                                prompt_ids[start:start + BON_CHUNK_PROMPTS]))
        ids, gold, names, members = cache_matrices(rewards, where)
        if m is None:
            m = gold.shape[1]
            j = held_out_judges(s, m, where)
            ns = sorted({n for n in s.evaluation.bon_ns if n <= m})
        elif gold.shape[1] != m:
            raise StageError(f"{where}: prompt {ids[0]} has {gold.shape[1]} samples, expected "
                             f"M={m} as the first prompts")
        beats = beat_fraction(gold[:, j:], gold[:, :j])  # the same for every objective
        curves = {obj: _chunk_curves(score, gold, ns, j, beats)
                  for obj, score in objective_matrices(members, names, lambdas, stats).items()}
        chunks.append((len(ids), curves))
    frames = []
    for obj in chunks[0][1]:
        c = _combine([(size, curves[obj]) for size, curves in chunks])
        frames.append(pl.DataFrame({
            "objective": [obj] * len(ns),
            "n": ns,
            "proxy": c["proxy"],
            "gold": c["gold"],
            "kl_analytic": [float(bon_kl(n)) for n in ns],
            "kl_ties": c["kl_ties"],
            "win_rate_ref": c["win_rate_ref"],
            "win_rate_judges": [j] * len(ns),
            "n_prompts": [len(prompt_ids)] * len(ns),
            "pool_size": [m] * len(ns),
        }, schema_overrides={"win_rate_ref": pl.Float64}))
        log.info("bon curve %s: gold %s", obj, np.round(c["gold"], 4).tolist())
    write_table(pl.concat(frames), out, "bon_curve",
                provenance(s, "bon_curve", ns=ns, M=m, prompts=len(prompt_ids), judges=j))


def _chunk_curves(score: np.ndarray, gold: np.ndarray, ns: list[int], j: int,
                  beats: np.ndarray) -> dict[str, list]:
    """One objective's means over a chunk's prompts: proxy, gold, tie-aware KL and win rate
    (``beats``: the pool's beat fractions against the ``j`` judges)."""
    proxy_curve, gold_curve = bon_curve(score, gold, ns)
    return {"proxy": proxy_curve.tolist(), "gold": gold_curve.tolist(),
            "kl_ties": bon_kl_ties_batch(score, ns).tolist(),
            "win_rate_ref": _bon_win_rates(score[:, j:], beats, ns)}


def _combine(chunks: list[tuple[int, dict[str, list]]]) -> dict[str, list]:
    """Means over all prompts from the chunks' means, weighted by their prompts (one chunk:
    its means as they are). None (no value at that n) stays None."""
    if len(chunks) == 1:
        return chunks[0][1]
    total = sum(size for size, _ in chunks)
    return {key: [None if values[0] is None else
                  float(sum(size * v for (size, _), v in zip(chunks, values, strict=True))
                        / total)
                  for values in zip(*(c[key] for _, c in chunks), strict=True)]
            for key in chunks[0][1]}
