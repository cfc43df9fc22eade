"""Stage ``train``: one method run from the SFT policy on the reward cache."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from pipeline_lib.io.atomic import PathLike, atomic_dir
from pipeline_lib.io.guard import checkpoint_guard
from pipeline_lib.io.schemas import SCHEMAS
from pipeline_lib.io.tables import read_polars, write_table
from pipeline_lib.math.cdf import CurveFit
from pipeline_lib.math.vbon import vbon_rewards
from pipeline_lib.models.encoding import encode_prompt
from pipeline_lib.models.loading import save_model
from pipeline_lib.settings.config import config_hash
from pipeline_lib.settings.methods import (
    MethodRun,
    kl_coefficient,
    proxy_objective,
    training_seed,
)
from pipeline_lib.settings.sections import Settings, as_dict
from pipeline_lib.stages.common import (
    StageError,
    dispatch_training_job,
    is_main_process,
    launch_info,
    provenance,
    remove_checkpoint,
    setup_job,
)
from pipeline_lib.stages.generate import load_policy, policy_source
from pipeline_lib.stages.reward_cache import load_proxy
from pipeline_lib.train.ppo.config import PPOConfig
from pipeline_lib.train.ppo.trainer import train_ppo
from pipeline_lib.train.preference import train_preference
from pipeline_lib.train.preference_objective import PreferenceConfig, effective_beta

log = logging.getLogger("pipeline")


def _policy_log_rows(rows: Sequence[Mapping[str, Any]], method: str) -> pl.DataFrame:
    names = SCHEMAS["policy_log"].names
    out = []
    for r in rows:
        row = {k: r.get(k) for k in names}
        row["method"] = method
        if "kl_k1" in r:
            row["kl"], row["kl_estimator"] = r["kl_k1"], "k1_rollout"
        elif "kl_best_k1" in r:
            row["kl"], row["kl_estimator"] = r["kl_best_k1"], "logratio_cached_best"
        out.append(row)
    schema = {k: pl.Float64 for k in names} | {"step": pl.Int32, "method": pl.String,
                                                "kl_estimator": pl.String}
    return pl.DataFrame(out, schema=schema)


def run_train(
    config: Settings | Mapping[str, Any],
    name: str,
    policy_dir: PathLike | None,
    out_dir: PathLike,
    log_table: PathLike,
    checkpoint_dir: PathLike,
    prompts_path: PathLike | None = None,
    cdf_path: PathLike | None = None,
    rewards_path: PathLike | None = None,
    reward_models: Mapping[str, PathLike] | None = None,
    pairs_path: PathLike | None = None,
    threads: int | None = None,
) -> None:
    """Train one method run from the SFT policy; checkpoints resume a killed job.

    With ``training.launch.accelerate_config`` set, the run is :func:`train_job` in
    ``training.launch.num_processes`` processes under ``accelerate launch``; otherwise it runs
    in this process.
    """
    s = Settings.from_config(config)
    run = s.methods[name]
    ckpt = Path(checkpoint_dir)
    checkpoint_guard(ckpt, {"spec": run.as_dict(), "training": s.source["training"],
                            "policy": s.source["policy"], "config_hash": config_hash(s.source)},
                     [policy_dir, prompts_path, cdf_path, rewards_path, pairs_path,
                      *(reward_models or {}).values()])
    dispatch_training_job("train", train_job, s, threads, ckpt, name=name, policy_dir=policy_dir,
                          out_dir=out_dir, log_table=log_table, checkpoint_dir=ckpt,
                          prompts_path=prompts_path, cdf_path=cdf_path,
                          rewards_path=rewards_path, pairs_path=pairs_path,
                          reward_models={k: str(v) for k, v in (reward_models or {}).items()})
    remove_checkpoint(ckpt)


def train_job(
    config: Settings | Mapping[str, Any],
    name: str,
    policy_dir: PathLike | None,
    out_dir: PathLike,
    log_table: PathLike,
    checkpoint_dir: PathLike,
    prompts_path: PathLike | None = None,
    cdf_path: PathLike | None = None,
    rewards_path: PathLike | None = None,
    reward_models: Mapping[str, PathLike] | None = None,
    pairs_path: PathLike | None = None,
    threads: int | None = None,
) -> None:
    """The training of :func:`run_train`, in one process or in each rank of a launch; the
    main process writes the policy and the log table."""
    s = Settings.from_config(config)
    run = s.methods[name]
    device = setup_job(s, threads, "train", name)
    tokenizer, policy = load_policy(s, policy_source(s, policy_dir), "cpu")
    train_seed = training_seed(s.seed, run)
    ckpt = Path(checkpoint_dir)
    on_log = lambda r: log.info("%s %s", name, json.dumps(r, default=float))  # noqa: E731
    if run.is_ppo:
        proxy = run_proxy(s, run, reward_models or {}, rewards_path, device)
        inputs = PPOInputs(read_polars(prompts_path, "prompts"), cdf_path, pairs_path)
        rows, model = _train_ppo_method(s, run, tokenizer, policy, proxy, inputs, train_seed,
                                        ckpt, on_log)
        objective, lam = proxy_objective(run, s.cdf)
        extra = {"kl_coef": kl_coefficient(run), "proxy_objective": objective,
                 **({"proxy_uwo_lambda": lam} if objective == "uwo" else {})}
    else:
        pc = PreferenceConfig(
            method=run.method, beta=float(run.beta or 0.1), n=int(run.n), alpha=float(run.alpha),
            label_smoothing=float(run.label_smoothing), bonbon_variant=run.bonbon_variant,
            device=s.device, **{**as_dict(s.training.preference), **run.overrides},
            # the cached reference log-probs of the pairs are at generation's sampling settings
            temperature=s.generation.temperature, top_p=s.generation.top_p,
            top_k=s.generation.top_k,
        )
        rows, model = train_preference(policy, tokenizer, read_polars(pairs_path, "pairs"), pc,
                                       seed=train_seed, checkpoint_dir=ckpt, on_log=on_log)
        extra = {"beta": effective_beta(pc)}
    if not is_main_process():
        return
    with atomic_dir(out_dir) as tmp:
        save_model(model, tokenizer, tmp)
    write_table(_policy_log_rows(rows, run.method), log_table, "policy_log",
                provenance(s, "train", run=name, method=run.method, spec=run.as_dict(),
                           **launch_info(s), **extra))


def run_proxy(s: Settings, run: MethodRun, reward_models: Mapping[str, PathLike],
              rewards_path: PathLike | None, device):
    """The ensemble proxy a PPO-family run trains on: the members and normalisation of the
    ``cdf`` stage, combined by the run's objective (a ppo run's own ``objective`` /
    ``uwo_lambda``, else ``cdf``'s)."""
    objective, lam = proxy_objective(run, s.cdf)
    log.info("%s: proxy objective %s%s", run.name, objective,
             f" (lambda {lam:g})" if objective == "uwo" else "")
    return load_proxy(s.cdf, s.reward_models, s.scoring.batch_size, reward_models, rewards_path,
                      device, objective=objective, uwo_lambda=lam)


@dataclass(frozen=True)
class PPOInputs:
    """What a PPO-family run reads besides the policy: its prompts, and the CDF and pairs
    tables where its method needs them."""

    prompts: pl.DataFrame
    cdf_path: PathLike | None
    pairs_path: PathLike | None


def ppo_config(s: Settings, run: MethodRun) -> PPOConfig:
    """The PPO trainer's config of a ppo / vbon / bond run: ``training.ppo`` with the run's
    overrides, its KL coefficient and BOND weight, and the sampling settings of ``generation``.
    Each method keeps its coefficient rule: only ppo may adapt beta (``adaptive_kl``)."""
    g = s.generation
    settings = {**as_dict(s.training.ppo), **run.overrides}
    if run.method != "ppo" and settings["adaptive_kl"]:
        # vbon and bond keep beta = 1/(n-1): an adaptive coefficient in training.ppo is PPO's
        log.info("%s: training.ppo.adaptive_kl applies to ppo runs only; beta stays 1/(n-1)",
                 run.name)
        settings["adaptive_kl"] = False
    return PPOConfig.from_mapping({
        **settings,
        "kl_coef": kl_coefficient(run),
        "sft_weight": (1.0 - float(run.w)) if run.method == "bond" else 0.0,
        "temperature": g.temperature, "top_p": g.top_p, "top_k": g.top_k,
        "max_new_tokens": g.max_new_tokens, "device": s.device,
    })


def cdf_rows(cdf_path: PathLike, prompt_ids: Sequence[str], curvefit: bool
             ) -> tuple[np.ndarray, list[CurveFit | None] | None]:
    """Each prompt's sorted cached rewards (P, M), in ``prompt_ids`` order, and its curve fit
    (with ``curvefit``)."""
    cdf = read_polars(cdf_path, "cdf")
    by_id = {r["prompt_id"]: r for r in cdf.iter_rows(named=True)}
    missing = [p for p in prompt_ids if p not in by_id]
    if missing:
        raise StageError(f"{cdf_path}: no CDF for prompt(s) {missing[:5]}")
    ordered = [by_id[p] for p in prompt_ids]
    rows = np.array([r["sorted_rewards"] for r in ordered], dtype=np.float64)
    fits = [CurveFit(r["fit_a"], r["fit_b"], r["fit_c"], r["fit_rmse"], True)
            if r["fit_ok"] else None for r in ordered] if curvefit else None
    return rows, fits


def _train_ppo_method(s: Settings, run: MethodRun, tokenizer, policy, proxy,
                      inputs: PPOInputs, seed: int, ckpt: Path, on_log):
    texts = inputs.prompts["prompt"].to_list()
    rows_of_prompt, fits = None, None
    if run.uses_cdf:
        rows_of_prompt, fits = cdf_rows(inputs.cdf_path, inputs.prompts["prompt_id"].to_list(),
                                        s.cdf.curvefit)
        log.info("%s: bound %s, KL coefficient 1/(n-1) = %.4f, exact-bound scale %s",
                 run.method, run.bound, kl_coefficient(run),
                 "1/(n-1)" if run.exact_scale == "n_minus_1" else "1/n (vBoN code)")

    def reward_fn(idx: np.ndarray, responses: list[str], ids: list[list[int]]) -> np.ndarray:
        r = proxy.score([texts[i] for i in idx], responses)
        if rows_of_prompt is None:
            return r
        return vbon_rewards(rows_of_prompt[idx], r, int(run.n), run.bound, run.exact_scale,
                            [fits[i] for i in idx] if fits else None)

    sft_examples = None
    if run.method == "bond":
        pairs = read_polars(inputs.pairs_path, "pairs")
        sft_examples = [(encode_prompt(tokenizer, p), list(ids)) for p, ids in
                        zip(pairs["prompt"], pairs["best_token_ids"], strict=True)]
    return train_ppo(policy, tokenizer, texts, reward_fn, ppo_config(s, run), seed=seed,
                     checkpoint_dir=ckpt, sft_examples=sft_examples, on_log=on_log)
