"""Stage ``prs_compare``: best-of-N with random sampling vs PRS at each N."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import polars as pl

from pipeline_lib.generation.prs import prs_sample
from pipeline_lib.generation.prs_tables import HFTextGenerator, prompt_preferences
from pipeline_lib.generation.sampling import SamplingParams
from pipeline_lib.io.tables import read_polars, write_table
from pipeline_lib.math.seeding import derive_seed
from pipeline_lib.models.scorers import gold_scorer
from pipeline_lib.settings.sections import Settings
from pipeline_lib.stages.common import PathLike, provenance, setup_job
from pipeline_lib.stages.figures import plot_prs_compare
from pipeline_lib.stages.generate import make_backend, prs_config
from pipeline_lib.stages.reward_cache import load_proxy

log = logging.getLogger("pipeline")


def comparison_scorer(s: Settings, device, reward_models=None, train_rewards=None):
    """score(instructions, responses) for the comparison: the proxy ensemble or the gold
    scorer on (prompt, response), or (``gold_response``) the gold scorer on the response alone
    (an empty prompt)."""
    kind = s.prs_compare.scorer
    if kind == "proxy":
        return load_proxy(s.cdf, s.reward_models, s.scoring.batch_size, reward_models or {},
                          train_rewards, device).score
    gold = gold_scorer(s.gold, device)
    if kind == "gold_response":
        return lambda prompts, responses: gold.score([""] * len(responses), list(responses))
    return gold.score


def _rows(strategy: str, n: int, prompt_ids, results) -> list[dict]:
    rows = []
    for pid, samples in zip(prompt_ids, results, strict=True):
        for x in samples:
            rows.append(dict(strategy=strategy, N=n, prompt_id=pid, sample_idx=x.sample_idx,
                             layer=x.layer, parent_idx=x.parent_idx, response=x.text,
                             n_tokens=len(x.token_ids), extra_tokens=x.extra_tokens,
                             score=x.score))
    return rows


def compare_summary(samples: pl.DataFrame) -> pl.DataFrame:
    """Per (strategy, N): best-of-N score, layer means, generated tokens, PRS-vs-random wins."""
    best = samples.group_by("strategy", "N", "prompt_id").agg(
        pl.col("score").max().alias("best"),
        (pl.col("n_tokens").sum() + pl.col("extra_tokens").sum()).alias("tokens"))
    rand = best.filter(pl.col("strategy") == "random").select(
        "N", "prompt_id", pl.col("best").alias("best_random"))
    best = best.join(rand, on=["N", "prompt_id"], how="left").with_columns(
        ((pl.col("best") > pl.col("best_random")).cast(pl.Float64)
         + 0.5 * (pl.col("best") == pl.col("best_random")).cast(pl.Float64)).alias("win"))
    last = samples.group_by("strategy", "N").agg(pl.col("layer").max().alias("last_layer"))
    layer_means = samples.join(last, on=["strategy", "N"]).group_by("strategy", "N").agg(
        pl.col("score").filter(pl.col("layer") == 0).mean().alias("mean_score_layer0"),
        pl.col("score").filter(pl.col("layer") == pl.col("last_layer")).mean()
        .alias("mean_score_last_layer"),
        pl.col("score").mean().alias("mean_score"))
    summary = best.group_by("strategy", "N").agg(
        pl.col("best").mean().alias("best_of_n"),
        (pl.col("best").std(ddof=1) / pl.len().sqrt()).fill_null(0.0).alias("best_of_n_se"),
        pl.col("tokens").mean().cast(pl.Float64).alias("tokens_per_prompt"),
        pl.when(pl.col("strategy").first() == "random").then(None)
        .otherwise(pl.col("win").mean()).alias("win_rate_vs_random"),
        pl.len().cast(pl.Int32).alias("n_prompts"))
    return summary.join(layer_means, on=["strategy", "N"]).sort("N", "strategy")


def run_prs_compare(
    config: Settings | Mapping[str, Any], model_dir: PathLike, instructions: PathLike,
    samples_out: PathLike, summary_out: PathLike, figure: PathLike,
    reward_models: Mapping[str, PathLike] | None = None, train_rewards: PathLike | None = None,
    threads: int | None = None,
) -> None:
    """Best-of-N reward of random sampling vs PRS at each N, same prompts, scorer and z.

    ``random`` draws N i.i.d. responses to the layer-1 prompt (x, z) (PRS with one layer);
    ``prs`` draws N/2, reflects on the best one and draws N/2 refinements."""
    s = Settings.from_config(config)

    device = setup_job(s, threads, "prs-compare")
    c = s.prs_compare
    prompts = read_polars(instructions, "prompts")
    is_policy = c.model == "sft"
    if model_dir is None:  # a model by hub id, or pi_ref by name when SFT is off
        model_dir = s.policy.ref if is_policy else c.ref
    backend = make_backend(s, model_dir, device, policy=is_policy)
    params = SamplingParams(c.temperature, c.top_p, c.top_k, c.max_new_tokens)
    score = comparison_scorer(s, device, reward_models, train_rewards)
    rows: list[dict] = []
    texts, prefs = prompts["prompt"].to_list(), prompt_preferences(prompts)
    for n in c.ns:
        for strategy, layers in (("random", 1), ("prs", None)):
            cfg = prs_config(s.prs, n, layers=layers, preference=c.preference)
            gen = HFTextGenerator(backend, cfg.use_chat_template, params=params,
                                  batch_size=c.batch_size)
            results = prs_sample(gen, score, texts, prefs, cfg,
                                 derive_seed(s.seed, "prs-compare", n, strategy))
            rows += _rows(strategy, n, prompts["prompt_id"].to_list(), results)
            log.info("%s N=%d: best-of-N %.4f (%d prompts cut to fit the context)", strategy, n,
                     float(np.mean([max(x.score for x in r) for r in results])),
                     gen.n_truncated)
    samples = pl.DataFrame(rows, schema_overrides={"N": pl.Int32, "sample_idx": pl.Int32,
                                                   "layer": pl.Int8, "parent_idx": pl.Int32,
                                                   "n_tokens": pl.Int32,
                                                   "extra_tokens": pl.Int32})
    prov = provenance(s, "prs_compare", model=model_dir, scorer=c.scorer, ns=c.ns)
    write_table(samples, samples_out, "prs_samples", prov)
    summary = compare_summary(samples)
    write_table(summary, summary_out, "prs_compare", prov)
    plot_prs_compare(summary, figure)
