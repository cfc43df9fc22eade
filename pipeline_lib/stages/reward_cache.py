"""Reading a long reward cache as matrices: completeness checks, the proxy members, the ensemble
objective, and the ensemble proxy that scores fresh policy samples."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import polars as pl

from pipeline_lib.io.atomic import PathLike
from pipeline_lib.io.tables import read_polars
from pipeline_lib.math.ensembles import ensemble, member_stats, zscore_members
from pipeline_lib.models.scorers import EnsembleProxy, member_settings, reward_model_scorer
from pipeline_lib.settings.sections import CDFSettings, RewardModelSettings
from pipeline_lib.stages.common import StageError


def check_complete(table: pl.DataFrame, prompt_ids: Sequence[str], m: int, where: str) -> None:
    """Every prompt present with sample_idx 0..m-1 exactly once, nothing else."""
    expected = len(prompt_ids) * m
    dup = table.select("prompt_id", "sample_idx").is_duplicated()
    if dup.any():
        row = table.filter(dup).row(0, named=True)
        raise StageError(f"{where}: (prompt {row['prompt_id']}, sample {row['sample_idx']}) "
                         "appears more than once")
    counts = dict(table.group_by("prompt_id").len().iter_rows())
    for pid in prompt_ids:
        if counts.get(pid, 0) != m:
            raise StageError(f"{where}: prompt {pid} has {counts.get(pid, 0)} samples, expected "
                             f"M={m}")
    extra = set(counts) - set(prompt_ids)
    if extra:
        raise StageError(f"{where}: unknown prompt id(s) {sorted(extra)[:5]}")
    if table.height != expected or table["sample_idx"].max() >= m:
        raise StageError(f"{where}: {table.height} rows, expected {expected} with sample_idx < {m}")


def proxy_matrix(rewards: pl.DataFrame, where: str) -> tuple[list[str], np.ndarray, pl.DataFrame]:
    """Pivot the proxy rows of a reward cache to (k members, N responses).

    Returns member names, the (k, N) matrix and the (prompt_id, sample_idx) key frame of the
    N columns. Every member must score the same responses.
    """
    proxies = rewards.filter(pl.col("kind") == "proxy")
    if proxies.height == 0:
        raise StageError(f"{where}: no proxy rewards (kind == 'proxy') in the cache")
    names = sorted(proxies["scorer"].unique().to_list())
    wide = proxies.pivot(on="scorer", index=["prompt_id", "sample_idx"], values="reward")
    wide = wide.sort("prompt_id", "sample_idx")
    missing = wide.select(pl.col(names).is_null().any()).row(0)
    for name, miss in zip(names, missing, strict=True):
        if miss:
            raise StageError(f"{where}: scorer {name!r} lacks rewards for some samples")
    return names, wide.select(names).to_numpy().T.astype(np.float64), wide.select(
        "prompt_id", "sample_idx")


def ensemble_rewards(
    rewards: pl.DataFrame, cfg: CDFSettings, where: str,
    norm_reference: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """One proxy reward per (prompt, sample) under the configured ensemble objective."""
    names, members, keys = proxy_matrix(rewards, where)
    if cfg.normalize:
        ref_names, ref, _ = proxy_matrix(norm_reference if norm_reference is not None else rewards,
                                         f"{where} (normalisation reference)")
        if ref_names != names:
            raise StageError(f"{where}: normalisation reference has members {ref_names}, "
                             f"the cache has {names}")
        members = zscore_members(members, *member_stats(ref))
    proxy = ensemble(members, cfg.objective, uwo_lambda=cfg.uwo_lambda)
    return keys.with_columns(pl.Series("proxy", proxy))


def load_proxy(cfg: CDFSettings, members: RewardModelSettings, batch_size: int,
               reward_models: Mapping[str, PathLike], train_rewards: PathLike | None,
               device, objective: str | None = None,
               uwo_lambda: float | None = None) -> EnsembleProxy:
    """The ensemble proxy of the `cdf` stage (objective and normalisation of ``cfg``), for
    scoring fresh (prompt, response) pairs in batches of ``batch_size``. Its members: the
    trained seeds in ``reward_models`` (member name -> directory) and the pretrained reward
    models of ``members`` (``reward_models.pretrained``), in the reward cache's order.
    ``objective`` / ``uwo_lambda``: a ppo run's own ensemble objective in place of ``cfg``'s
    (:func:`pipeline_lib.settings.methods.proxy_objective`); the normalisation stays
    ``cfg``'s."""
    settings = member_settings(members, reward_models)
    if not settings:
        raise StageError("the proxy ensemble has no members: reward_models.seeds and "
                         "reward_models.pretrained are both empty")
    stats = None
    if cfg.normalize:
        names, ref, _ = proxy_matrix(read_polars(train_rewards, "rewards"), str(train_rewards))
        if names != [m.name for m in settings]:
            raise StageError(f"{train_rewards}: the normalisation reference has members "
                             f"{names}, the proxy ensemble {[m.name for m in settings]}")
        stats = member_stats(ref)
    scorers = [reward_model_scorer(m, device, batch_size=batch_size) for m in settings]
    return EnsembleProxy(scorers, objective if objective is not None else cfg.objective,
                         uwo_lambda if uwo_lambda is not None else cfg.uwo_lambda, stats)


def cache_matrices(rewards: pl.DataFrame, where: str) -> tuple[list[str], np.ndarray,
                                                              list[str], np.ndarray]:
    """(prompt ids, gold (P, M), member names, members (k, P, M)) from a long reward cache."""
    prompt_ids = sorted(rewards["prompt_id"].unique().to_list())
    gold = rewards.filter(pl.col("kind") == "gold").sort("prompt_id", "sample_idx")
    if gold.height == 0:
        raise StageError(f"{where}: no gold rewards in the cache")
    m = gold.height // len(prompt_ids)
    check_complete(gold, prompt_ids, m, f"{where} (gold)")
    names, members, keys = proxy_matrix(rewards, where)
    if keys.height != gold.height:
        raise StageError(f"{where}: proxies score {keys.height} samples, gold {gold.height}")
    p = len(prompt_ids)
    return (prompt_ids, gold["reward"].to_numpy().reshape(p, m), names,
            members.reshape(len(names), p, m))


def normaliser_stats(cfg: CDFSettings, train_rewards: PathLike | None):
    """Each member's mean and sd on the train reward cache when ``cdf.normalize`` is set."""
    if not cfg.normalize:
        return None
    _, ref, _ = proxy_matrix(read_polars(train_rewards, "rewards"), str(train_rewards))
    return member_stats(ref)


def objective_matrices(
    members: np.ndarray, names: Sequence[str], uwo_lambdas: Sequence[float], stats=None
) -> dict[str, np.ndarray]:
    """Every selection score of the BoN curves: each member alone, mean, WCO and UWO (one per
    λ of ``uwo_lambdas``, named by :func:`uwo_curve_name`)."""
    k, p, m = members.shape
    flat = members.reshape(k, p * m)
    combined = zscore_members(flat, *stats) if stats is not None else flat
    out = {name: members[i] for i, name in enumerate(names)}
    out["mean"] = ensemble(combined, "mean").reshape(p, m)
    out["wco"] = ensemble(combined, "wco").reshape(p, m)
    for lam in uwo_lambdas:
        out[uwo_curve_name(lam, uwo_lambdas)] = ensemble(combined, "uwo",
                                                          uwo_lambda=lam).reshape(p, m)
    return out


def uwo_curve_lambdas(cfg: CDFSettings, uwo_lambdas: Sequence[float]) -> list[float]:
    """The UWO λ of the BoN curves: ``evaluation.uwo_lambdas`` and, when the methods train with
    the UWO objective, ``cdf.uwo_lambda`` too (appended when missing), so the curve of the
    trained ensemble is always there."""
    lambdas = list(dict.fromkeys(float(x) for x in uwo_lambdas))
    if cfg.objective == "uwo" and float(cfg.uwo_lambda) not in lambdas:
        lambdas.append(float(cfg.uwo_lambda))
    return lambdas


def uwo_curve_name(lam: float, lambdas: Sequence[float]) -> str:
    """``uwo`` when the curves have one λ, else ``uwo-l<λ>``."""
    return "uwo" if len(lambdas) == 1 else f"uwo-l{lam:g}"


def configured_objective_name(cfg: CDFSettings, uwo_lambdas: Sequence[float]) -> str:
    """The BoN-curve objective that matches the ensemble the methods were trained with (its
    UWO curve uses ``cdf.uwo_lambda``, see :func:`uwo_curve_lambdas`)."""
    if cfg.objective == "uwo":
        return uwo_curve_name(cfg.uwo_lambda, uwo_curve_lambdas(cfg, uwo_lambdas))
    return cfg.objective
