"""Stage ``evaluate``: samples of one policy on the test prompts, scored, with KL and win rates."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import polars as pl

from pipeline_lib.generation.hf import sequence_logprobs
from pipeline_lib.io.tables import read_polars, write_table
from pipeline_lib.math.kl import kl_k1, kl_k3, mean_and_se
from pipeline_lib.math.losses import bonbon_beta
from pipeline_lib.math.winrate import win_rate, win_rate_vs_bon
from pipeline_lib.models.encoding import encode_prompt
from pipeline_lib.models.loading import load_causal_lm
from pipeline_lib.models.scorers import gold_scorer
from pipeline_lib.settings.methods import MethodRun, kl_coefficient
from pipeline_lib.settings.sections import Settings
from pipeline_lib.stages.bon_curve import held_out_judges
from pipeline_lib.stages.budget import BUDGET_COLUMNS, BUDGET_TYPES
from pipeline_lib.stages.common import PathLike, StageError, provenance, setup_job
from pipeline_lib.stages.generate import (
    generate_table,
    make_backend,
    policy_source,
    sampling_columns,
    sampling_params,
)
from pipeline_lib.stages.reward_cache import (
    cache_matrices,
    configured_objective_name,
    load_proxy,
    normaliser_stats,
    objective_matrices,
    uwo_curve_lambdas,
)

log = logging.getLogger("pipeline")


def run_evaluate(
    config: Settings | Mapping[str, Any],
    name: str,
    policy_dir: PathLike,
    reference_dir: PathLike,
    prompts_path: PathLike,
    reward_models: Mapping[str, PathLike],
    test_rewards: PathLike,
    train_rewards: PathLike,
    samples_out: PathLike,
    summary_out: PathLike,
    threads: int | None = None,
) -> None:
    """K samples per test prompt: gold, proxy, KL to the reference and win rates (against the
    held-out judges of the test cache, and against the reference's best of win_rate_n)."""
    s = Settings.from_config(config)
    device = setup_job(s, threads, "evaluate", name)
    k = s.evaluation.samples_per_prompt
    prompts = read_polars(prompts_path, "prompts")
    samples = policy_samples(s, name, policy_dir, reference_dir, prompts, reward_models,
                             train_rewards, device)
    write_table(samples, samples_out, "eval_samples",
                provenance(s, "evaluate", policy=name, K=k))

    ref_rewards = read_polars(test_rewards, "rewards")
    ref_ids, ref_gold, names, members = cache_matrices(ref_rewards, str(test_rewards))
    stats = normaliser_stats(s.cdf, train_rewards)
    lambdas = uwo_curve_lambdas(s.cdf, s.evaluation.uwo_lambdas)
    ref_proxy = objective_matrices(members, names, lambdas, stats)[
        configured_objective_name(s.cdf, lambdas)]
    if ref_ids != sorted(prompts["prompt_id"].to_list()):
        raise StageError(f"{test_rewards}: cached prompts differ from {prompts_path}")
    pol_gold = samples.sort("prompt_id", "sample_idx")["gold"].to_numpy().reshape(len(ref_ids), k)
    gold, proxy = samples["gold"].to_numpy(), samples["proxy"].to_numpy()
    kl, kl_se = mean_and_se(kl_k1(samples["logp_policy"].to_numpy(),
                                  samples["logp_ref"].to_numpy()))
    method, beta, n = method_of(name, s.methods)
    summary = pl.DataFrame([{
        "policy": name, "method": method, "beta": beta, "n": n,
        "gold": float(gold.mean()), "gold_se": float(gold.std(ddof=1) / np.sqrt(gold.size)),
        "proxy": float(proxy.mean()), "kl": kl, "kl_se": kl_se, "kl_estimator": "k1",
        "kl_k3": float(samples["k3_sum"].to_numpy().sum() / max(samples["n_tokens"].sum(), 1)),
        **policy_win_rates(s, pol_gold, ref_proxy, ref_gold, str(test_rewards)),
        "pareto": False,
        # the summary fills these: the run's sweep and seed, and its budget (training logs)
        "sweep": None, "seed": None, **dict.fromkeys(BUDGET_COLUMNS),
        **sampling_columns(s),
    }], schema_overrides={"beta": pl.Float64, "n": pl.Int32, "win_rate_n": pl.Int32,
                          "win_rate_judges": pl.Int32, "top_k": pl.Int32, "sweep": pl.String,
                          "seed": pl.Int32, **BUDGET_TYPES})
    log.info("evaluation %s: %s", name, summary.row(0, named=True))
    write_table(summary, summary_out, "eval_summary", provenance(s, "evaluate", policy=name))


def policy_win_rates(s: Settings, pol_gold: np.ndarray, ref_proxy: np.ndarray,
                     ref_gold: np.ndarray, where: str) -> dict[str, float | int]:
    """A policy's gold win rates, ``(P, K)`` policy samples against the ``(P, M)`` test cache:

    * ``win_rate_ref`` against the held-out judges (the first ``win_rate_judges`` samples of
      each prompt, :func:`pipeline_lib.stages.bon_curve.held_out_judges`), the judges of the
      BoN points' ``win_rate_ref`` too, with the same ties-count-½ rule;
    * ``win_rate_bon`` against the reference's proxy-best of ``win_rate_n`` (capped at M), over
      all M samples: the policy's samples are independent of the whole cache."""
    m = ref_gold.shape[1]
    n_bon = min(s.evaluation.win_rate_n, m)
    judges = held_out_judges(s, m, where)
    return {"win_rate_ref": win_rate(pol_gold, ref_gold[:, :judges]),
            "win_rate_bon": win_rate_vs_bon(pol_gold, ref_proxy, ref_gold, n_bon),
            "win_rate_n": n_bon, "win_rate_judges": judges}


def policy_samples(s: Settings, name: str, policy_dir: PathLike, reference_dir: PathLike,
                   prompts: pl.DataFrame, reward_models: Mapping[str, PathLike],
                   train_rewards: PathLike, device) -> pl.DataFrame:
    """The ``eval_samples`` rows of one policy: K samples per prompt (the same seed for every
    policy), their gold and proxy rewards, sequence log-probs under the policy and the
    reference — both their sampling distributions at ``generation``'s temperature, top-p and
    top-k, the distributions the KL axis refers to — and the summed per-token k3."""
    backend = make_backend(s, policy_dir, device)
    table = generate_table(backend, prompts, None, s.evaluation.samples_per_prompt,
                           s.generation, s.seed, "eval")
    tok = backend.tokenizer
    prompt_ids = [encode_prompt(tok, t) for t in table["prompt"]]
    responses = table["response_token_ids"].to_list()
    # π and π_ref are the sampling distributions (temperature, top-p, top-k of `generation`);
    # the policy scores its own samples, so they stay in its support (keep_tokens)
    params = sampling_params(s.generation)
    pol_tok = sequence_logprobs(backend.model, prompt_ids, responses, tok.pad_token_id, device,
                                per_token=True, params=params, keep_tokens=True)
    ref_source = policy_source(s, reference_dir)
    if policy_source(s, policy_dir) == ref_source:  # the reference itself: KL 0 exactly
        ref_tok = [a.copy() for a in pol_tok]
    else:
        ref_model = load_causal_lm(ref_source, device, "policy")
        ref_tok = sequence_logprobs(ref_model, prompt_ids, responses, tok.pad_token_id, device,
                                    per_token=True, params=params)
    outside = sum(int(np.isneginf(a).sum()) for a in ref_tok)
    if outside:
        raise StageError(
            f"evaluate {name}: {outside} sampled token(s) lie outside pi_ref's top-p/top-k "
            f"support (generation.top_p = {params.top_p}, generation.top_k = {params.top_k}), "
            "so KL(pi || pi_ref) between the sampling distributions is infinite; evaluate "
            "policies with generation.top_p = 1 and generation.top_k = 0")
    # k3 per token on the policy's own samples, summed over each response
    k3 = np.array([float(np.sum(kl_k3(p, r))) for p, r in zip(pol_tok, ref_tok, strict=True)])
    pairs = table["prompt"].to_list(), table["response"].to_list()
    gold = gold_scorer(s.gold, device).score(*pairs)
    proxy = load_proxy(s.cdf, s.reward_models, s.scoring.batch_size, reward_models,
                       train_rewards, device).score(*pairs)
    return table.select("prompt_id", "sample_idx", "response", "n_tokens").with_columns(
        pl.lit(name).alias("policy"), pl.Series("gold", gold), pl.Series("proxy", proxy),
        pl.Series("logp_policy", np.array([a.sum() for a in pol_tok])),
        pl.Series("logp_ref", np.array([a.sum() for a in ref_tok])),
        pl.Series("k3_sum", k3))


def method_of(name: str, runs: Mapping[str, MethodRun]) -> tuple[str, float | None, int | None]:
    """(method, beta, n) of a policy for the summary: the KL coefficient of ppo / vbon / bond,
    BoNBoN's beta*, the run's beta for dpo / ipo; the SFT reference has none."""
    if name == "sft":
        return "sft", None, None
    run = runs[name]
    if run.is_ppo:
        beta = kl_coefficient(run)
    elif run.method == "bonbon":
        beta = bonbon_beta(int(run.n))
    else:
        beta = run.beta
    return run.method, beta, run.n
