"""One declared pyarrow schema per table (column docs included) and the columns that must be finite.
Reads and writes go through :mod:`pipeline_lib.io.tables`."""

from __future__ import annotations

import pyarrow as pa

PROVENANCE_KEY = b"bon_pipeline.provenance"


SCHEMA_KEY = b"bon_pipeline.schema"


class SchemaError(ValueError):
    """A table does not match its declared schema (message names the file and column)."""


def _f(name: str, typ: pa.DataType, nullable: bool = False, doc: str = "") -> pa.Field:
    return pa.field(name, typ, nullable=nullable, metadata={b"doc": doc.encode()} if doc else None)


SCHEMAS: dict[str, pa.Schema] = {
    "corpus": pa.schema(
        [
            _f("text_id", pa.string(), doc="stable id of the source row"),
            _f("group", pa.string(), doc="split group (movie name by default)"),
            _f("text", pa.string(),
               doc="format text_prefix: the full source text; else the SFT target ('' if none)"),
            _f("prompt", pa.string(), nullable=True,
               doc="the prompt SFT conditions on (loss on text only); null: SFT on the whole text"),
        ]
    ),
    "prompts": pa.schema(
        [
            _f("prompt_id", pa.string(), doc="unique id, '<split>-<index>'"),
            _f("split", pa.string(), doc="train, test or pref"),
            _f("prompt", pa.string(), doc="the prompt text (a 2-8 word prefix by default)"),
            _f("text_id", pa.string(), doc="source row (the text a prefix was cut from)"),
            _f("group", pa.string(), doc="split group of the source text"),
            _f("n_words", pa.int32(), doc="words in the prompt"),
            _f("preference", pa.string(), nullable=True, doc="per-prompt preference z (PRS)"),
        ]
    ),
    "samples": pa.schema(
        [
            _f("prompt_id", pa.string()),
            _f("sample_idx", pa.int32(), doc="0..M-1 within the prompt"),
            _f("prompt", pa.string()),
            # null only in an imported cache (reference_cache.source: import) whose format
            # lacks them; every sampled cache fills them
            _f("response", pa.string(), nullable=True,
               doc="decoded continuation (prompt excluded); null: an imported cache without texts"),
            _f("response_token_ids", pa.list_(pa.int32()), nullable=True,
               doc="generated ids incl. a final EOS; null: imported cache"),
            _f("n_tokens", pa.int32(), nullable=True,
               doc="len(response_token_ids); null: imported cache"),
            _f("finished", pa.bool_(), nullable=True,
               doc="generation ended with EOS before max_new_tokens; null: imported cache"),
            _f("ref_logprob", pa.float64(), nullable=True,
               doc="sum of log pi_ref(token) over the response; null: imported cache"),
            _f("strategy", pa.string(), doc="sampling strategy: random or prs"),
            _f("layer", pa.int8(), doc="PRS layer (0 for random sampling)"),
            _f("parent_idx", pa.int32(), doc="PRS parent sample_idx, -1 if none"),
        ]
    ),
    "rewards": pa.schema(
        [
            _f("prompt_id", pa.string()),
            _f("sample_idx", pa.int32()),
            _f("scorer", pa.string(), doc="'gold' or a proxy name like 'rm-seed1'"),
            _f("kind", pa.string(), doc="'gold' or 'proxy'"),
            _f("reward", pa.float64(), doc="the scorer's reward for prompt + response"),
        ]
    ),
    "cdf": pa.schema(
        [
            _f("prompt_id", pa.string()),
            _f("objective", pa.string(), doc="ensemble objective: mean, wco, uwo or a member"),
            _f("n_samples", pa.int32(), doc="M, the number of cached rewards"),
            _f("sorted_rewards", pa.list_(pa.float64()), doc="the M proxy rewards, ascending"),
            _f("fit_a", pa.float64(), nullable=True, doc="curvefit: log F ~ -a exp(-b r) - c"),
            _f("fit_b", pa.float64(), nullable=True),
            _f("fit_c", pa.float64(), nullable=True),
            _f("fit_rmse", pa.float64(), nullable=True, doc="curvefit residual (log space)"),
            _f("fit_ok", pa.bool_(), doc="curve fit succeeded (else the empirical CDF is used)"),
        ]
    ),
    "preferences": pa.schema(
        [
            _f("pair_id", pa.int32()),
            _f("prompt_id", pa.string()),
            _f("prompt", pa.string()),
            _f("chosen", pa.string(), doc="preferred response (after label noise)"),
            _f("rejected", pa.string()),
            _f("chosen_gold", pa.float64(), doc="gold reward of prompt + chosen"),
            _f("rejected_gold", pa.float64()),
            _f("flipped", pa.bool_(), doc="label noise flipped this pair"),
        ]
    ),
    "train_log": pa.schema(
        [
            _f("step", pa.int32()),
            _f("split", pa.string(), doc="'train' (running batch) or 'val' (held-out evaluation)"),
            _f("epoch", pa.float64()),
            _f("loss", pa.float64()),
            _f("lr", pa.float64()),
            _f("tokens", pa.int64(), doc="tokens (or pairs) processed so far"),
            _f("accuracy", pa.float64(), nullable=True, doc="pairwise accuracy (reward models)"),
            _f("elapsed_s", pa.float64()),
        ]
    ),
    "pairs": pa.schema(
        [
            _f("prompt_id", pa.string()),
            _f("n", pa.int32(), doc="BoN size: best and worst of the first n cached samples"),
            _f("prompt", pa.string()),
            _f("best_idx", pa.int32(), doc="sample_idx of the proxy-best of n"),
            _f("worst_idx", pa.int32(), doc="sample_idx of the proxy-worst of n"),
            _f("best_response", pa.string()),
            _f("worst_response", pa.string()),
            _f("best_token_ids", pa.list_(pa.int32())),
            _f("worst_token_ids", pa.list_(pa.int32())),
            _f("best_proxy", pa.float64(), doc="ensemble proxy reward of the best response"),
            _f("worst_proxy", pa.float64()),
            _f("best_ref_logprob", pa.float64(), doc="log pi_ref(best | prompt), summed"),
            _f("worst_ref_logprob", pa.float64()),
        ]
    ),
    "policy_log": pa.schema(
        [
            _f("step", pa.int32()),
            _f("method", pa.string(), doc="ppo, vbon, bond, dpo, ipo, bonbon or bon_sft"),
            _f("loss", pa.float64(), doc="the total training loss of the step"),
            _f("reward", pa.float64(), nullable=True,
               doc="PPO methods: mean sequence reward (proxy, or the vBoN reward)"),
            _f("kl", pa.float64(), nullable=True, doc="KL estimate named by kl_estimator"),
            _f("kl_estimator", pa.string(), nullable=True,
               doc="k1_rollout: mean sum_t log(pi/pi_ref) over on-policy samples; "
                   "logratio_cached_best: mean log(pi/pi_ref) on cached best responses "
                   "(not a policy KL)"),
            _f("kl_k3", pa.float64(), nullable=True, doc="mean per-token k3 on the rollout"),
            _f("entropy", pa.float64(), nullable=True, doc="mean per-token policy entropy"),
            _f("kl_coef", pa.float64(), nullable=True, doc="beta of the KL penalty"),
            _f("lr", pa.float64()),
            _f("policy_loss", pa.float64(), nullable=True),
            _f("value_loss", pa.float64(), nullable=True),
            _f("clipfrac", pa.float64(), nullable=True),
            _f("approx_kl", pa.float64(), nullable=True),
            _f("sft_nll", pa.float64(), nullable=True,
               doc="bond: forward-KL (SFT) term, NLL per target token"),
            _f("response_length", pa.float64(), nullable=True),
            _f("reward_margin", pa.float64(), nullable=True,
               doc="preference methods: mean h(y_w) - h(y_l)"),
            _f("accuracy", pa.float64(), nullable=True,
               doc="preference methods: fraction with h(y_w) > h(y_l)"),
            _f("chosen_logp", pa.float64(), nullable=True),
            _f("rejected_logp", pa.float64(), nullable=True),
            _f("grad_norm", pa.float64(), nullable=True),
            _f("elapsed_s", pa.float64()),
        ]
    ),
    "bon_curve": pa.schema(
        [
            _f("objective", pa.string(),
               doc="selection score: a single reward model (rm-seedK) or mean / wco / uwo"),
            _f("n", pa.int32()),
            _f("proxy", pa.float64(), doc="E[proxy of the proxy-best of n] (unbiased, no resampling)"),
            _f("gold", pa.float64(), doc="E[gold of the proxy-best of n], proxy ties averaged"),
            _f("kl_analytic", pa.float64(), doc="log n - (n-1)/n"),
            _f("kl_ties", pa.float64(), doc="tie-aware KL on the cache's empirical distribution"),
            _f("win_rate_ref", pa.float64(), nullable=True,
               doc="P(gold of BoN > gold of a held-out judge) + tie/2; BoN from the "
                   "pool_size - win_rate_judges non-judge samples (null when n exceeds them)"),
            _f("win_rate_judges", pa.int32(),
               doc="held-out judges per prompt: the first win_rate_judges samples by sample_idx"),
            _f("n_prompts", pa.int32()),
            _f("pool_size", pa.int32(), doc="M, cached samples per prompt (proxy, gold, KL)"),
        ]
    ),
    "eval_samples": pa.schema(
        [
            _f("policy", pa.string(), doc="sft or a method run name"),
            _f("prompt_id", pa.string()),
            _f("sample_idx", pa.int32()),
            _f("response", pa.string()),
            _f("n_tokens", pa.int32()),
            _f("gold", pa.float64()),
            _f("proxy", pa.float64(), doc="ensemble objective of the proxy reward models"),
            _f("logp_policy", pa.float64(), doc="log pi(y|x), summed over tokens"),
            _f("logp_ref", pa.float64(), doc="log pi_ref(y|x), summed over tokens"),
            _f("k3_sum", pa.float64(), doc="sum over tokens of the k3 KL estimator"),
        ]
    ),
    "eval_summary": pa.schema(
        [
            _f("policy", pa.string()),
            _f("method", pa.string(), doc="sft, bon, or the training method"),
            _f("beta", pa.float64(), nullable=True, doc="KL coefficient (ppo, dpo, ...) or 1/(n-1)"),
            _f("n", pa.int32(), nullable=True, doc="BoN size of the method / BoN point"),
            _f("gold", pa.float64(), doc="mean gold reward"),
            _f("gold_se", pa.float64(), nullable=True),
            _f("proxy", pa.float64(), doc="mean ensemble proxy reward"),
            _f("kl", pa.float64(), doc="KL(pi || pi_ref), estimator in kl_estimator"),
            _f("kl_se", pa.float64(), nullable=True),
            _f("kl_estimator", pa.string(),
               doc="k1 (mean log pi/pi_ref over policy samples; may be < 0 by noise), "
                   "bon_analytic or bon_ties"),
            _f("kl_k3", pa.float64(), nullable=True, doc="per-token k3 estimate (>= 0)"),
            _f("win_rate_ref", pa.float64(), nullable=True,
               doc="gold win rate against the held-out reference samples (win_rate_judges per "
                   "prompt); null for a BoN point whose n exceeds M - win_rate_judges"),
            _f("win_rate_bon", pa.float64(), nullable=True,
               doc="gold win rate against the reference's proxy-best of win_rate_n"),
            _f("win_rate_n", pa.int32()),
            _f("win_rate_judges", pa.int32(),
               doc="held-out judges per prompt of win_rate_ref: the first win_rate_judges "
                   "cached test samples by sample_idx, the same for policies and BoN points"),
            _f("pareto", pa.bool_(),
               doc="on the (KL, gold) Pareto frontier of this table with uncertainty: no other "
                   "row has lower KL and higher gold by more than 1.96 combined standard errors "
                   "(math.frontier.pareto_flags_se; BoN's analytic KL has no error)"),
            _f("sweep", pa.string(), nullable=True,
               doc="the methods entry the run belongs to (MethodRun.sweep); null for sft, bon"),
            _f("seed", pa.int32(), nullable=True,
               doc="the run's training seed (an entry with seeds); null otherwise"),
            # budget (summary only; pipeline_lib.stages.budget): null in an evaluate row
            _f("reference_samples", pa.int64(), nullable=True,
               doc="cached reference samples the run trains on (vbon/bond: M per train prompt; "
                   "pair methods: n per train prompt); BoN: n per test prompt at inference"),
            _f("policy_samples", pa.int64(), nullable=True,
               doc="fresh policy samples drawn in training (PPO rollouts)"),
            _f("tokens_generated", pa.int64(), nullable=True,
               doc="response tokens of those samples"),
            _f("reward_model_calls", pa.int64(), nullable=True,
               doc="proxy scorings in training (samples x members); BoN: of its n samples"),
            _f("train_steps", pa.int64(), nullable=True, doc="logged training steps"),
            _f("train_wall_s", pa.float64(), nullable=True, doc="training wall time (s)"),
            # the sampling distribution that pi and pi_ref (and so kl, kl_k3) refer to
            _f("temperature", pa.float64(), doc="generation.temperature of pi and pi_ref"),
            _f("top_p", pa.float64(), doc="generation.top_p (1 = no nucleus truncation)"),
            _f("top_k", pa.int32(), doc="generation.top_k (0 = no top-k truncation)"),
        ]
    ),
    "frontier": pa.schema(
        [
            _f("sweep", pa.string(), doc="the methods entry (MethodRun.sweep) the runs come from"),
            _f("method", pa.string()),
            _f("knob", pa.string(), nullable=True, doc="the swept key (null: one point)"),
            _f("n_points", pa.int64(), doc="knob values in the sweep"),
            _f("n_seeds", pa.int64(), doc="training seeds per knob value"),
            _f("bon_n", pa.int64(), doc="the BoN point whose KL this grid point is"),
            _f("metric", pa.string(), doc="gold (mean gold reward) or win_rate (vs the held-out judges)"),
            _f("kl", pa.float64(), doc="grid KL: log n - (n-1)/n of BoN at bon_n"),
            _f("covered", pa.bool_(), doc="the sweep's KL range (full data) contains this KL"),
            _f("boot_coverage", pa.float64(), doc="fraction of bootstrap replicates whose sweep reaches it"),
            _f("bon_boot_coverage", pa.float64()),
            _f("method_estimate", pa.float64(), nullable=True, doc="the sweep's value, interpolated along it at this KL: full-data estimate (null where the sweep does not reach this KL)"),
            _f("method_low", pa.float64(), nullable=True, doc="the sweep's value, interpolated along it at this KL: percentile CI low (null where the sweep does not reach this KL)"),
            _f("method_high", pa.float64(), nullable=True, doc="the sweep's value, interpolated along it at this KL: percentile CI high (null where the sweep does not reach this KL)"),
            _f("method_se", pa.float64(), nullable=True, doc="the sweep's value, interpolated along it at this KL: bootstrap SE (null where the sweep does not reach this KL)"),
            _f("bon_estimate", pa.float64(), nullable=True, doc="BoN's value at this n: full-data estimate (null where the sweep does not reach this KL)"),
            _f("bon_low", pa.float64(), nullable=True, doc="BoN's value at this n: percentile CI low (null where the sweep does not reach this KL)"),
            _f("bon_high", pa.float64(), nullable=True, doc="BoN's value at this n: percentile CI high (null where the sweep does not reach this KL)"),
            _f("bon_se", pa.float64(), nullable=True, doc="BoN's value at this n: bootstrap SE (null where the sweep does not reach this KL)"),
            _f("gap_estimate", pa.float64(), nullable=True, doc="method - BoN, paired over prompts: full-data estimate (null where the sweep does not reach this KL)"),
            _f("gap_low", pa.float64(), nullable=True, doc="method - BoN, paired over prompts: percentile CI low (null where the sweep does not reach this KL)"),
            _f("gap_high", pa.float64(), nullable=True, doc="method - BoN, paired over prompts: percentile CI high (null where the sweep does not reach this KL)"),
            _f("gap_se", pa.float64(), nullable=True, doc="method - BoN, paired over prompts: bootstrap SE (null where the sweep does not reach this KL)"),
            _f("kl_estimator", pa.string(), doc="the sweep's KL estimator (k1)"),
            _f("bon_kl_estimator", pa.string(), doc="BoN's KL (analytic_bon)"),
            _f("level", pa.float64(), doc="confidence level of low/high"),
        ]
    ),
    "prs_samples": pa.schema(
        [
            _f("strategy", pa.string(), doc="random (N i.i.d. samples of (x, z)) or prs"),
            _f("N", pa.int32(), doc="samples per prompt; best-of-N picks among them"),
            _f("prompt_id", pa.string()),
            _f("sample_idx", pa.int32()),
            _f("layer", pa.int8(), doc="PRS layer (0 = first layer; random: 0)"),
            _f("parent_idx", pa.int32(), doc="sample_idx of the refined response, -1 if none"),
            _f("response", pa.string()),
            _f("n_tokens", pa.int32(), doc="generated response tokens"),
            _f("extra_tokens", pa.int32(), doc="feedback tokens spent for this layer (counted once)"),
            _f("score", pa.float64(), doc="the comparison's scorer"),
        ]
    ),
    "prs_compare": pa.schema(
        [
            _f("strategy", pa.string()),
            _f("N", pa.int32()),
            _f("best_of_n", pa.float64(), doc="mean over prompts of the best score among N"),
            _f("best_of_n_se", pa.float64()),
            _f("mean_score", pa.float64(), doc="mean score of all N samples"),
            _f("mean_score_layer0", pa.float64(), doc="mean score of the first layer"),
            _f("mean_score_last_layer", pa.float64(), doc="mean score of the last layer"),
            _f("tokens_per_prompt", pa.float64(),
               doc="generated tokens per prompt: responses + PRS feedback"),
            _f("win_rate_vs_random", pa.float64(), nullable=True,
               doc="P(best of PRS > best of random) + tie/2 per prompt, same N"),
            _f("n_prompts", pa.int32()),
        ]
    ),
}


# Float columns where NaN or +-inf is an error on write and on read (a null of a nullable
# column is no value and passes).
FINITE_COLUMNS: dict[str, tuple[str, ...]] = {
    "samples": ("ref_logprob",),
    "rewards": ("reward",),
    "preferences": ("chosen_gold", "rejected_gold"),
    "pairs": ("best_proxy", "worst_proxy", "best_ref_logprob", "worst_ref_logprob"),
    "policy_log": ("loss",),
    "bon_curve": ("proxy", "gold"),
    "eval_samples": ("gold", "proxy", "logp_policy", "logp_ref"),
    "prs_samples": ("score",),
}


def describe_schema(name: str) -> str:
    """Human-readable description of a declared schema (used in the README and errors)."""
    schema = SCHEMAS[name]
    lines = [f"{name}:"]
    for field in schema:
        doc = (field.metadata or {}).get(b"doc", b"").decode()
        null = " (nullable)" if field.nullable else ""
        lines.append(f"  {field.name}: {field.type}{null}" + (f"  -- {doc}" if doc else ""))
    return "\n".join(lines)

if __name__ == "__main__":  # python -m pipeline_lib.io.schemas: print every declared table
    print("\n\n".join(describe_schema(name) for name in SCHEMAS))
