"""Evaluation stages: BoN curves from the test cache, per-policy evaluation, the summary.

Wiring only: the estimators live in :mod:`pipeline_lib.evaluation` (pure numpy).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import polars as pl

from pipeline_lib.evaluation import (
    bon_curve,
    bon_kl,
    bon_kl_ties_batch,
    kl_k1,
    pareto_frontier,
    win_rate,
    win_rate_vs_bon,
)
from pipeline_lib.generation import sequence_logprobs
from pipeline_lib.modeling import encode_prompt, load_causal_lm
from pipeline_lib.rewards import ensemble, member_stats, zscore_members
from pipeline_lib.schemas import atomic_file, read_polars, write_table
from pipeline_lib.stages import (
    PathLike,
    StageError,
    _setup,
    check_complete,
    generate_table,
    load_proxy,
    make_backend,
    provenance,
    proxy_matrix,
)

log = logging.getLogger("pipeline")


# ---------------------------------------------------------------------------------------------
# reward-cache matrices
# ---------------------------------------------------------------------------------------------
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


def _normaliser(config: Mapping[str, Any], train_rewards: PathLike | None):
    if not config["cdf"]["normalize"]:
        return None
    _, ref, _ = proxy_matrix(read_polars(train_rewards, "rewards"), str(train_rewards))
    return member_stats(ref)


def objective_matrices(
    members: np.ndarray, names: Sequence[str], config: Mapping[str, Any], stats=None
) -> dict[str, np.ndarray]:
    """Every selection score of the BoN curves: each member alone, mean, WCO and UWO (per λ)."""
    k, p, m = members.shape
    flat = members.reshape(k, p * m)
    combined = zscore_members(flat, *stats) if stats is not None else flat
    out = {name: members[i] for i, name in enumerate(names)}
    out["mean"] = ensemble(combined, "mean").reshape(p, m)
    out["wco"] = ensemble(combined, "wco").reshape(p, m)
    lambdas = config["evaluation"]["uwo_lambdas"]
    for lam in lambdas:
        key = "uwo" if len(lambdas) == 1 else f"uwo-l{lam:g}"
        out[key] = ensemble(combined, "uwo", uwo_lambda=lam).reshape(p, m)
    return out


def configured_objective_name(config: Mapping[str, Any]) -> str:
    """The BoN-curve objective that matches the ensemble the methods were trained with."""
    obj, lambdas = config["cdf"]["objective"], config["evaluation"]["uwo_lambdas"]
    if obj == "uwo" and len(lambdas) > 1:
        return f"uwo-l{config['cdf']['uwo_lambda']:g}"
    return obj


# ---------------------------------------------------------------------------------------------
# bon_curve
# ---------------------------------------------------------------------------------------------
def run_bon_curve(config: Mapping[str, Any], rewards_path: PathLike,
                  train_rewards: PathLike | None, out: PathLike) -> None:
    """BoN curves on the test cache for every selection objective and n on the grid."""
    rewards = read_polars(rewards_path, "rewards")
    prompt_ids, gold, names, members = cache_matrices(rewards, str(rewards_path))
    p, m = gold.shape
    ns = sorted({n for n in config["evaluation"]["bon_ns"] if n <= m})
    frames = []
    for obj, score in objective_matrices(members, names, config,
                                         _normaliser(config, train_rewards)).items():
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
                provenance(config, "bon_curve", ns=ns, M=m, prompts=len(prompt_ids)))


# ---------------------------------------------------------------------------------------------
# evaluate one policy
# ---------------------------------------------------------------------------------------------
def run_evaluate(
    config: Mapping[str, Any],
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
    """K samples per test prompt: gold, proxy, KL to the reference and win rates."""
    from pipeline_lib.losses import bonbon_beta
    from pipeline_lib.methods import kl_coefficient, method_runs
    from pipeline_lib.scorers import gold_scorer

    device = _setup(config, threads, "evaluate", name)
    ev = config["evaluation"]
    k = ev["samples_per_prompt"]
    prompts = read_polars(prompts_path, "prompts")
    backend = make_backend(config, policy_dir, device)
    table = generate_table(backend, prompts, None, k, config, "eval")  # same seed for all policies
    tok = backend.tokenizer
    prompt_ids = [encode_prompt(tok, t) for t in table["prompt"]]
    responses = table["response_token_ids"].to_list()
    pol_tok = sequence_logprobs(backend.model, prompt_ids, responses, tok.pad_token_id, device,
                                per_token=True)
    ref_model = load_causal_lm(reference_dir, device, "policy")
    ref_tok = sequence_logprobs(ref_model, prompt_ids, responses, tok.pad_token_id, device,
                                per_token=True)
    logp_pol = np.array([a.sum() for a in pol_tok])
    logp_ref = np.array([a.sum() for a in ref_tok])
    # k3 per token: exp(r) - 1 - r with r = log pi_ref - log pi, on the policy's own samples
    k3 = np.array([float(np.sum(np.expm1(r - p) - (r - p))) for p, r in
                   zip(pol_tok, ref_tok, strict=True)])
    texts = [p + r for p, r in zip(table["prompt"], table["response"], strict=True)]
    gold = gold_scorer(config["gold"], device).score(texts)
    proxy = load_proxy(config, reward_models, train_rewards, device).score(texts)
    samples = table.select("prompt_id", "sample_idx", "response", "n_tokens").with_columns(
        pl.lit(name).alias("policy"), pl.Series("gold", gold), pl.Series("proxy", proxy),
        pl.Series("logp_policy", logp_pol), pl.Series("logp_ref", logp_ref),
        pl.Series("k3_sum", k3))
    write_table(samples, samples_out, "eval_samples",
                provenance(config, "evaluate", policy=name, K=k))

    ref_rewards = read_polars(test_rewards, "rewards")
    ref_ids, ref_gold, names, members = cache_matrices(ref_rewards, str(test_rewards))
    stats = _normaliser(config, train_rewards)
    ref_proxy = objective_matrices(members, names, config, stats)[configured_objective_name(config)]
    if ref_ids != sorted(prompts["prompt_id"].to_list()):
        raise StageError(f"{test_rewards}: cached prompts differ from {prompts_path}")
    pol_gold = samples.sort("prompt_id", "sample_idx")["gold"].to_numpy().reshape(len(ref_ids), k)
    kl, kl_se = kl_k1(logp_pol, logp_ref)
    n_bon = min(ev["win_rate_n"], ref_gold.shape[1])
    if name == "sft":
        method, beta, n = "sft", None, None
    else:
        spec = method_runs(config)[name]
        method, n = spec["method"], spec.get("n")
        if method in ("ppo", "vbon", "bond"):
            beta = kl_coefficient(spec)
        elif method == "bonbon":
            beta = bonbon_beta(int(n))
        else:
            beta = spec.get("beta")
    summary = pl.DataFrame([{
        "policy": name, "method": method, "beta": beta, "n": n,
        "gold": float(gold.mean()), "gold_se": float(gold.std(ddof=1) / np.sqrt(gold.size)),
        "proxy": float(proxy.mean()), "kl": kl, "kl_se": kl_se, "kl_estimator": "k1",
        "kl_k3": float(k3.sum() / max(table["n_tokens"].sum(), 1)),
        "win_rate_ref": win_rate(pol_gold, ref_gold),
        "win_rate_bon": win_rate_vs_bon(pol_gold, ref_proxy, ref_gold, n_bon),
        "win_rate_n": n_bon, "pareto": False,
    }], schema_overrides={"beta": pl.Float64, "n": pl.Int32, "win_rate_n": pl.Int32})
    log.info("evaluation %s: %s", name, summary.row(0, named=True))
    write_table(summary, summary_out, "eval_summary", provenance(config, "evaluate", policy=name))


# ---------------------------------------------------------------------------------------------
# summary and figures
# ---------------------------------------------------------------------------------------------
def summary_table(config: Mapping[str, Any], evals: Sequence[PathLike],
                  bon_path: PathLike) -> pl.DataFrame:
    """Every policy's summary row plus the BoN points of the configured objective, with the
    (KL, gold) Pareto frontier marked over all of them."""
    rows = pl.concat([read_polars(p, "eval_summary") for p in evals])
    bon = read_polars(bon_path, "bon_curve").filter(
        pl.col("objective") == configured_objective_name(config))
    bon_rows = bon.select(
        pl.format("bon-n{}", pl.col("n")).alias("policy"), pl.lit("bon").alias("method"),
        (1.0 / (pl.col("n") - 1).cast(pl.Float64)).alias("beta"), pl.col("n"),
        pl.col("gold"), pl.lit(None, pl.Float64).alias("gold_se"), pl.col("proxy"),
        pl.col("kl_analytic").alias("kl"), pl.lit(None, pl.Float64).alias("kl_se"),
        pl.lit("bon_analytic").alias("kl_estimator"), pl.lit(None, pl.Float64).alias("kl_k3"),
        pl.col("win_rate_ref"), pl.lit(None, pl.Float64).alias("win_rate_bon"),
        pl.lit(rows["win_rate_n"][0], pl.Int32).alias("win_rate_n"), pl.lit(False).alias("pareto"),
    ).with_columns(pl.when(pl.col("n") == 1).then(None).otherwise(pl.col("beta")).alias("beta"))
    table = pl.concat([rows, bon_rows.cast(rows.schema)])
    front = pareto_frontier(table["kl"].to_numpy(), table["gold"].to_numpy())
    return table.with_columns(pl.Series("pareto", front))


def run_summary(config: Mapping[str, Any], evals: Sequence[PathLike], bon_path: PathLike,
                out: PathLike, figures: Mapping[str, PathLike],
                csv: Mapping[str, PathLike] | None = None) -> None:
    """summary.parquet, CSV copies for the HTML report, and the three figures."""
    table = summary_table(config, evals, bon_path)
    write_table(table, out, "eval_summary", provenance(config, "summary"))
    bon = read_polars(bon_path, "bon_curve")
    for frame, path in ((table, (csv or {}).get("summary")), (bon, (csv or {}).get("bon"))):
        if path:
            _write_csv(frame, path)
    plot_bon_curves(bon, figures["bon_curves"])
    plot_kl_gold(table, bon.filter(pl.col("objective") == configured_objective_name(config)),
                 figures["kl_gold"])
    plot_win_rates(table, figures["win_rates"])


def _write_csv(frame: pl.DataFrame, path: PathLike) -> None:
    with atomic_file(path) as tmp:
        frame.write_csv(tmp, float_precision=6)


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_bon_curves(bon: pl.DataFrame, path: PathLike) -> None:
    """Proxy and gold reward of BoN against KL(π_BoN‖π_ref), one line per objective."""
    plt = _figure()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for (obj,), part in bon.group_by(["objective"], maintain_order=True):
        style = "-" if obj in ("mean", "wco") or obj.startswith("uwo") else ":"
        for ax, col in zip(axes, ("proxy", "gold"), strict=True):
            ax.plot(part["kl_analytic"], part[col], style, marker="o", ms=3, label=obj)
    for ax, col in zip(axes, ("proxy", "gold"), strict=True):
        ax.set_xlabel("KL(BoN || ref) = log n - (n-1)/n  [nats]")
        ax.set_ylabel(f"E[{col} reward of best-of-n]")
        ax.set_title(f"BoN: {col} reward")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, title="selection by")
    fig.tight_layout()
    _save(fig, path)


def plot_kl_gold(table: pl.DataFrame, bon: pl.DataFrame, path: PathLike) -> None:
    """Every policy in the (KL, gold) plane with the BoN curve and the Pareto frontier."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 4.8))
    ax.plot(bon["kl_analytic"], bon["gold"], "-", color="0.6", label="best-of-n (cache)")
    pol = table.filter(pl.col("method") != "bon")
    for row in pol.iter_rows(named=True):
        ax.errorbar(row["kl"], row["gold"], xerr=row["kl_se"], yerr=row["gold_se"], fmt="o",
                    ms=6, capsize=2, label=row["policy"])
    front = table.filter(pl.col("pareto")).sort("kl")
    ax.plot(front["kl"], front["gold"], "k--", lw=1, label="Pareto frontier")
    ax.set_xlabel("KL(pi || pi_ref) [nats]  (k1 for policies, analytic for BoN)")
    ax.set_ylabel("mean gold reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    _save(fig, path)


def plot_win_rates(table: pl.DataFrame, path: PathLike) -> None:
    """Gold win rate of each policy against reference samples and the reference's BoN."""
    plt = _figure()
    pol = table.filter(pl.col("method") != "bon")
    x = np.arange(pol.height)
    n = int(pol["win_rate_n"][0])
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * pol.height + 2), 4))
    ax.bar(x - 0.2, pol["win_rate_ref"], 0.4, label="vs reference sample")
    ax.bar(x + 0.2, pol["win_rate_bon"], 0.4, label=f"vs reference best-of-{n}")
    ax.axhline(0.5, color="k", lw=0.8)
    ax.axhline(n / (n + 1), color="0.5", ls=":", lw=0.8, label=f"BoN-{n} vs reference: n/(n+1)")
    ax.set_xticks(x, pol["policy"].to_list(), rotation=30, ha="right")
    ax.set_ylabel("gold win rate (ties = 1/2)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: PathLike) -> None:
    import matplotlib.pyplot as plt

    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
