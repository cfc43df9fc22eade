"""Pipeline stages: each reads its input files, calls library functions, writes its outputs.

The Snakemake scripts in ``workflow/scripts`` are one call into this module each, so every
stage can also be run (and tested) without Snakemake.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from pipeline_lib import __version__
from pipeline_lib.cdf import fit_log_cdf, group_sorted_matrix
from pipeline_lib.config import config_hash
from pipeline_lib.data import load_corpus, make_prompts, split_by_group
from pipeline_lib.generation import (
    HFBackend,
    SamplingParams,
    prompt_groups,
    sample_groups,
    sequence_logprobs,
    shard_groups,
)
from pipeline_lib.modeling import (
    build_scratch_policy,
    encode_prompt,
    load_causal_lm,
    load_tokenizer,
    pick_device,
    save_model,
    train_tokenizer,
)
from pipeline_lib.rewards import ensemble, member_stats, zscore_members
from pipeline_lib.schemas import read_polars, read_table, write_table
from pipeline_lib.scorers import gold_scorer, reward_model_scorer
from pipeline_lib.seeding import derive_seed, seed_everything

log = logging.getLogger("pipeline")
PathLike = str | os.PathLike


class StageError(RuntimeError):
    """A stage's inputs are inconsistent (message names the file and what is wrong)."""


def provenance(config: Mapping[str, Any], stage: str, **extra: Any) -> dict[str, Any]:
    return {
        "stage": stage,
        "config_hash": config_hash(config),
        "seed": config["seed"],
        "task": config["task"],
        "pipeline_version": __version__,
        **{k: str(v) if isinstance(v, Path) else v for k, v in extra.items()},
    }


def _setup(config: Mapping[str, Any], threads: int | None, *seed_parts: object) -> torch.device:
    if threads:
        torch.set_num_threads(int(threads))
    seed_everything(derive_seed(config["seed"], *seed_parts))
    return pick_device(config["device"])


@contextmanager
def atomic_dir(path: PathLike):
    """Build a directory next to ``path`` and rename it into place only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------------------------
def run_prompts(
    config: Mapping[str, Any], prompts_out: Mapping[str, PathLike], corpus_out: Mapping[str, PathLike]
) -> None:
    """Load the corpus, split it by group, cut prompts for the train / test / pref splits."""
    corpus, source = load_corpus(config["corpus"])
    train, test = split_by_group(corpus, config["prompts"]["test_fraction"], config["seed"])
    log.info("corpus %s: %d texts, %d train / %d test (split by group)", source,
             corpus.height, train.height, test.height)
    pc, seed = config["prompts"], config["seed"]
    kw = dict(min_words=pc["min_words"], max_words=pc["max_words"], seed=seed,
              preference=pc["preference"])
    tables = {
        "train": make_prompts(train, pc["n_train"], "train", **kw),
        "test": make_prompts(test, pc["n_test"], "test", **kw),
    }
    tables["pref"] = make_prompts(train, pc["n_pref"], "pref",
                                  exclude_text_ids=tables["train"]["text_id"].to_list(), **kw)
    prov = provenance(config, "prompts", corpus=source)
    for split, path in prompts_out.items():
        write_table(tables[split], path, "prompts", prov)
    for split, frame in (("train", train), ("test", test)):
        write_table(frame, corpus_out[split], "corpus", prov)


# ---------------------------------------------------------------------------------------------
# sft
# ---------------------------------------------------------------------------------------------
def _is_main_process() -> bool:
    """False only in the non-main ranks of an ``accelerate launch`` (they write nothing)."""
    from accelerate import PartialState

    return PartialState().is_main_process


def _dispatch(stage: str, config: Mapping[str, Any], threads: int | None, workdir: PathLike,
              **kwargs: Any) -> None:
    """Run a training job (``sft``, ``reward_model``, ``train``) in this process, or, with
    ``training.launch.accelerate_config`` set, in ``training.launch.num_processes`` processes
    under ``accelerate launch`` (:mod:`pipeline_lib.launch`)."""
    kwargs = {k: (str(v) if isinstance(v, Path) else v) for k, v in kwargs.items()}
    if config["training"]["launch"]["accelerate_config"] is None:
        TRAINING_JOBS[stage](config, threads=threads, **kwargs)
    else:
        from pipeline_lib.launch import run_launched

        run_launched(stage, config, kwargs, threads, workdir=Path(workdir))


def run_sft(
    config: Mapping[str, Any],
    corpus_train: PathLike,
    corpus_test: PathLike,
    out_dir: PathLike,
    log_table: PathLike,
    checkpoint_dir: PathLike | None = None,
    threads: int | None = None,
) -> None:
    """Train the reference policy: from scratch (BPE tokenizer + GPT-2) or from a local model
    (in one process, or several: ``training.launch``). With ``checkpoint_dir``, a killed job
    resumes from its last checkpoint (``sft.checkpoint_every``)."""
    base = config["policy"]["base"]
    ckpt = _training_checkpoint(config, checkpoint_dir, ("policy", "sft"),
                                [corpus_train, corpus_test, None if base == "scratch" else base])
    _dispatch("sft", config, threads, ckpt or Path(out_dir).parent,
              corpus_train=str(corpus_train), corpus_test=str(corpus_test), out_dir=str(out_dir),
              log_table=str(log_table), checkpoint_dir=ckpt and str(ckpt))
    _remove_checkpoint(ckpt)


def _training_checkpoint(
    config: Mapping[str, Any], checkpoint_dir: PathLike | None, sections: Sequence[str],
    inputs: Sequence[PathLike | None], **extra: Any,
) -> Path | None:
    """The SFT / reward-model job's checkpoint directory, guarded by its config sections and
    inputs (:func:`_checkpoint_guard`); None without one."""
    if checkpoint_dir is None:
        return None
    ckpt = Path(checkpoint_dir)
    settings = {k: config[k] for k in ("seed", "device", *sections)}
    _checkpoint_guard(ckpt, {**settings, "launch": config["training"]["launch"], **extra},
                      inputs)
    return ckpt


def _remove_checkpoint(ckpt: Path | None) -> None:
    """The job is complete (outputs written): a rerun starts afresh."""
    if ckpt is not None:
        shutil.rmtree(ckpt, ignore_errors=True)


def sft_job(
    config: Mapping[str, Any],
    corpus_train: PathLike,
    corpus_test: PathLike,
    out_dir: PathLike,
    log_table: PathLike,
    checkpoint_dir: PathLike | None = None,
    threads: int | None = None,
) -> None:
    """The training of :func:`run_sft` (every rank of a launch); the main process writes."""
    _setup(config, threads, "sft")
    train_texts = read_polars(corpus_train, "corpus")["text"].to_list()
    val_texts = read_polars(corpus_test, "corpus")["text"].to_list()[:512]
    pol = config["policy"]
    if pol["base"] == "scratch":
        # Under a launch every rank trains it: BPE training is deterministic (the same
        # vocabulary in separate processes and with any thread count, checked on the default
        # corpus), so all ranks encode alike.
        tokenizer = train_tokenizer(train_texts, pol["vocab_size"])
        model = build_scratch_policy(tokenizer, pol)
        log.info("scratch GPT-2: %d parameters, vocab %d",
                 sum(p.numel() for p in model.parameters()), len(tokenizer))
    else:
        tokenizer = load_tokenizer(pol["base"])
        model = load_causal_lm(pol["base"])
        model.config.pad_token_id = tokenizer.pad_token_id
    cfg = {**config["sft"], "device": config["device"]}
    rows, model = _train_sft(model, tokenizer, train_texts, val_texts, cfg, config,
                             checkpoint_dir)
    if not _is_main_process():
        return
    with atomic_dir(out_dir) as tmp:
        save_model(model, tokenizer, tmp)
    write_table(pl.DataFrame(rows, schema_overrides={"accuracy": pl.Float64}), log_table,
                "train_log", provenance(config, "sft", base=pol["base"], **_launch_info(config)))


def _launch_info(config: Mapping[str, Any]) -> dict[str, Any]:
    """Provenance of how a training job ran."""
    from accelerate import PartialState

    return {"processes": PartialState().num_processes,
            "accelerate_config": config["training"]["launch"]["accelerate_config"]}


def _train_sft(model, tokenizer, train_texts, val_texts, cfg, config, checkpoint_dir=None):
    from pipeline_lib.training import train_sft

    return train_sft(model, tokenizer, train_texts, val_texts, cfg,
                     seed=derive_seed(config["seed"], "sft-order"),
                     on_log=lambda r: log.info("sft %s", json.dumps(r)),
                     checkpoint_dir=checkpoint_dir)


# ---------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------
def _sampling_params(config: Mapping[str, Any]) -> SamplingParams:
    g = config["generation"]
    return SamplingParams(temperature=g["temperature"], top_p=g["top_p"], top_k=g["top_k"],
                          max_new_tokens=g["max_new_tokens"])


def make_backend(config: Mapping[str, Any], policy_dir: PathLike, device):
    g = config["generation"]
    backend = g["backend"]
    tokenizer = load_tokenizer(policy_dir, "policy")
    model = load_causal_lm(policy_dir, device, "policy")
    if backend == "hf":
        return HFBackend(model, tokenizer, device)
    if backend == "vllm":
        from pipeline_lib.generation import VLLMBackend

        v = g["vllm"]
        return VLLMBackend(policy_dir, tokenizer, model, device,
                           tensor_parallel_size=v["tensor_parallel_size"],
                           gpu_memory_utilization=v["gpu_memory_utilization"], dtype=v["dtype"],
                           seed=config["seed"])
    raise StageError(f"config key generation.backend: unknown backend {backend!r}")


def generate_table(
    backend,
    prompts: pl.DataFrame,
    indices: Sequence[int] | None,
    m: int,
    config: Mapping[str, Any],
    split: str,
) -> pl.DataFrame:
    """Sample ``m`` responses for the prompts of the groups covering ``indices``; returns rows
    of the ``samples`` schema with reference log-probs."""
    tok = backend.tokenizer
    prompt_texts = prompts["prompt"].to_list()
    prompt_ids = [encode_prompt(tok, t) for t in prompt_texts]
    groups = prompt_groups(len(prompt_ids), m, config["generation"]["batch_size"])
    if indices is not None:
        wanted = set(indices)
        groups = [g for g in groups if g.start in wanted]
    sampled = sample_groups(backend, prompt_ids, groups, m, _sampling_params(config),
                            config["seed"], split)
    order = sorted(sampled)
    flat = [(i, j, r) for i in order for j, r in enumerate(sampled[i])]
    ref = sequence_logprobs(backend.model, [prompt_ids[i] for i, _, _ in flat],
                            [r.token_ids for _, _, r in flat], tok.pad_token_id, backend.device)
    eos = tok.eos_token_id
    ids = prompts["prompt_id"].to_list()
    return pl.DataFrame(
        {
            "prompt_id": [ids[i] for i, _, _ in flat],
            "sample_idx": [j for _, j, _ in flat],
            "prompt": [prompt_texts[i] for i, _, _ in flat],
            "response": tok.batch_decode(
                [[t for t in r.token_ids if t != eos] for _, _, r in flat],
                skip_special_tokens=True,
            ),
            "response_token_ids": [r.token_ids for _, _, r in flat],
            "n_tokens": [len(r.token_ids) for _, _, r in flat],
            "finished": [r.finished for _, _, r in flat],
            "ref_logprob": ref,
            "strategy": ["random"] * len(flat),
            "layer": [0] * len(flat),
            "parent_idx": [-1] * len(flat),
        },
        schema_overrides={"response_token_ids": pl.List(pl.Int32)},
    )


def shard_group_starts(n_prompts: int, m: int, config: Mapping[str, Any], shard: int) -> list[int]:
    groups = prompt_groups(n_prompts, m, config["generation"]["batch_size"])
    return [g.start for g in shard_groups(groups, config["sampling"]["shards"], shard)]


def run_sample_shard(
    config: Mapping[str, Any],
    split: str,
    shard: int,
    policy_dir: PathLike,
    prompts_path: PathLike,
    out: PathLike,
    threads: int | None = None,
    reward_models: Mapping[str, PathLike] | None = None,
) -> None:
    """Sample M responses for one shard of a split's prompts (groups are seeded globally).

    With ``sampling.strategy: prs`` each prompt gets a PRS tree of M samples instead, guided
    by the proxy ensemble (``reward_models``)."""
    device = _setup(config, threads, "sample", split, shard)
    prompts = read_polars(prompts_path, "prompts")
    m = config["sampling"]["M"][split]
    starts = shard_group_starts(prompts.height, m, config, shard)
    backend = make_backend(config, policy_dir, device)
    strategy = config["sampling"]["strategy"]
    if strategy == "prs":
        table = _prs_shard(config, backend, prompts, starts, m, split, reward_models, device)
    else:
        table = generate_table(backend, prompts, starts, m, config, split)
    write_table(table, out, "samples",
                provenance(config, "sample", split=split, shard=shard, policy=policy_dir, M=m,
                           strategy=strategy))


def _prs_shard(config, backend, prompts, starts, m, split, reward_models, device):
    """PRS trees for the shard's prompt groups, guided by the (un-normalised) proxy ensemble;
    each group is seeded on its own, so the table does not depend on the shard count."""
    from pipeline_lib.prs_stages import prs_cache_table
    from pipeline_lib.scorers import EnsembleProxy

    if not reward_models:
        raise StageError("sampling.strategy 'prs' needs the proxy reward models")
    bs = config["scoring"]["batch_size"]
    proxy = EnsembleProxy([reward_model_scorer(p, n, device, batch_size=bs)
                           for n, p in sorted(reward_models.items())],
                          config["cdf"]["objective"], config["cdf"]["uwo_lambda"])

    def score(prompts_, responses):
        return proxy.score([p + r for p, r in zip(prompts_, responses, strict=True)])

    groups = prompt_groups(prompts.height, m, config["generation"]["batch_size"])
    frames = [prs_cache_table(backend, prompts[g.start : g.stop], m, config, f"{split}/{g.start}",
                              score) for g in groups if g.start in set(starts)]
    return pl.concat(frames)


def run_gather(
    config: Mapping[str, Any], split: str, shards: Sequence[PathLike], prompts_path: PathLike,
    out: PathLike,
) -> None:
    """Concatenate shards; check every prompt has samples 0..M-1 exactly once."""
    prompts = read_polars(prompts_path, "prompts")
    m = config["sampling"]["M"][split]
    table = pl.concat([read_polars(s, "samples") for s in shards])
    check_complete(table, prompts["prompt_id"].to_list(), m, f"{split} shards {list(shards)}")
    order = {p: i for i, p in enumerate(prompts["prompt_id"].to_list())}
    table = (table.with_columns(pl.col("prompt_id").replace_strict(order).alias("_o"))
             .sort("_o", "sample_idx").drop("_o"))
    write_table(table, out, "samples", provenance(config, "gather", split=split, M=m,
                                                  shards=len(shards)))


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


# ---------------------------------------------------------------------------------------------
# preferences and reward models
# ---------------------------------------------------------------------------------------------
def run_preferences(
    config: Mapping[str, Any], policy_dir: PathLike, prompts_path: PathLike, out: PathLike,
    threads: int | None = None,
) -> None:
    """Sample responses from the SFT policy, label pairs with the gold scorer (+ noise)."""
    device = _setup(config, threads, "preferences")
    prompts = read_polars(prompts_path, "prompts")
    k = config["preferences"]["samples_per_prompt"]
    backend = make_backend(config, policy_dir, device)
    samples = generate_table(backend, prompts, None, k, config, "pref")
    gold = gold_scorer(config["gold"], device)
    texts = [p + r for p, r in zip(samples["prompt"], samples["response"], strict=True)]
    samples = samples.with_columns(pl.Series("gold", gold.score(texts)))
    rng = np.random.default_rng(derive_seed(config["seed"], "preference-pairs"))
    rows = []
    for (pid,), grp in samples.group_by(["prompt_id"], maintain_order=True):
        g = grp["gold"].to_numpy()
        candidates = [(a, b) for a in range(len(g)) for b in range(a + 1, len(g)) if g[a] != g[b]]
        if not candidates:
            continue  # every response ties under the gold scorer: no preference signal
        a, b = candidates[rng.integers(len(candidates))]
        w, lo = (a, b) if g[a] > g[b] else (b, a)
        rows.append(dict(prompt_id=pid, prompt=grp["prompt"][0],
                         chosen=grp["response"][w], rejected=grp["response"][lo],
                         chosen_gold=float(g[w]), rejected_gold=float(g[lo])))
    if not rows:
        raise StageError(f"{prompts_path}: no prompt produced two responses with different gold "
                         "rewards; cannot build preference pairs")
    noise = config["preferences"]["label_noise"]
    flip = rng.random(len(rows)) < noise
    for row, f in zip(rows, flip, strict=True):
        row["flipped"] = bool(f)
        if f:
            row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
            row["chosen_gold"], row["rejected_gold"] = row["rejected_gold"], row["chosen_gold"]
    log.info("%d preference pairs from %d prompts (%d dropped as gold ties, %d flipped)",
             len(rows), prompts.height, prompts.height - len(rows), int(flip.sum()))
    frame = pl.DataFrame(rows).with_columns(pl.int_range(pl.len(), dtype=pl.Int32).alias("pair_id"))
    write_table(frame, out, "preferences",
                provenance(config, "preferences", policy=policy_dir, label_noise=noise))


def run_reward_model(
    config: Mapping[str, Any], seed: int, preferences: PathLike, policy_dir: PathLike,
    out_dir: PathLike, log_table: PathLike, checkpoint_dir: PathLike | None = None,
    threads: int | None = None,
) -> None:
    """Train one ensemble member: a one-logit classifier initialised from the SFT policy (in
    one process, or several: ``training.launch``). With ``checkpoint_dir``, a killed job
    resumes from its last checkpoint (``reward_models.checkpoint_every``)."""
    ckpt = _training_checkpoint(config, checkpoint_dir, ("reward_models",),
                                [preferences, policy_dir], rm_seed=int(seed))
    _dispatch("reward_model", config, threads, ckpt or Path(out_dir).parent, seed=int(seed),
              preferences=str(preferences), policy_dir=str(policy_dir), out_dir=str(out_dir),
              log_table=str(log_table), checkpoint_dir=ckpt and str(ckpt))
    _remove_checkpoint(ckpt)


def reward_model_job(
    config: Mapping[str, Any], seed: int, preferences: PathLike, policy_dir: PathLike,
    out_dir: PathLike, log_table: PathLike, checkpoint_dir: PathLike | None = None,
    threads: int | None = None,
) -> None:
    """The training of :func:`run_reward_model` (every rank); the main process writes."""
    from transformers import AutoModelForSequenceClassification

    from pipeline_lib.training import train_reward_model

    _setup(config, threads, "reward-model", seed)
    pairs = read_polars(preferences, "preferences")
    tokenizer = load_tokenizer(policy_dir, "policy")
    torch.manual_seed(derive_seed(seed, "rm-head"))  # the seed picks the head initialisation
    model = AutoModelForSequenceClassification.from_pretrained(
        policy_dir, num_labels=1, local_files_only=True, trust_remote_code=False
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    cfg = {**config["reward_models"], "device": config["device"]}
    texts_w = [p + r for p, r in zip(pairs["prompt"], pairs["chosen"], strict=True)]
    texts_l = [p + r for p, r in zip(pairs["prompt"], pairs["rejected"], strict=True)]
    rows, model = train_reward_model(model, tokenizer, texts_w, texts_l, cfg,
                                     seed=derive_seed(seed, "rm-order"),
                                     checkpoint_dir=checkpoint_dir)
    if not _is_main_process():
        return
    for r in rows:
        log.info("rm seed %d %s", seed, json.dumps(r))
    with atomic_dir(out_dir) as tmp:
        save_model(model, tokenizer, tmp)
    write_table(pl.DataFrame(rows), log_table, "train_log",
                provenance(config, "reward_model", rm_seed=seed, init=policy_dir,
                           **_launch_info(config)))


# ---------------------------------------------------------------------------------------------
# score
# ---------------------------------------------------------------------------------------------
def run_score(
    config: Mapping[str, Any], split: str, samples_path: PathLike,
    reward_models: Mapping[str, PathLike], out: PathLike, threads: int | None = None,
) -> None:
    """Score every cached sample with the gold scorer and every proxy reward model."""
    device = _setup(config, threads, "score", split)
    samples = read_polars(samples_path, "samples")
    texts = [p + r for p, r in zip(samples["prompt"], samples["response"], strict=True)]
    scorers = [gold_scorer(config["gold"], device)]
    bs = config["scoring"]["batch_size"]
    scorers += [reward_model_scorer(path, name, device, batch_size=bs)
                for name, path in reward_models.items()]
    frames = []
    for scorer in scorers:
        values = scorer.score(texts)
        log.info("%s on %s: mean %.4f sd %.4f", scorer.name, split, values.mean(), values.std())
        frames.append(samples.select("prompt_id", "sample_idx").with_columns(
            pl.lit(scorer.name).alias("scorer"), pl.lit(scorer.kind).alias("kind"),
            pl.Series("reward", values)))
    write_table(pl.concat(frames), out, "rewards",
                provenance(config, "score", split=split, gold=config["gold"]["type"],
                           reward_models={k: str(v) for k, v in reward_models.items()}))


# ---------------------------------------------------------------------------------------------
# cdf
# ---------------------------------------------------------------------------------------------
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
    rewards: pl.DataFrame, cfg: Mapping[str, Any], where: str,
    norm_reference: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """One proxy reward per (prompt, sample) under the configured ensemble objective."""
    names, members, keys = proxy_matrix(rewards, where)
    if cfg["normalize"]:
        ref_names, ref, _ = proxy_matrix(norm_reference if norm_reference is not None else rewards,
                                         f"{where} (normalisation reference)")
        if ref_names != names:
            raise StageError(f"{where}: normalisation reference has members {ref_names}, "
                             f"the cache has {names}")
        members = zscore_members(members, *member_stats(ref))
    proxy = ensemble(members, cfg["objective"], uwo_lambda=cfg["uwo_lambda"])
    return keys.with_columns(pl.Series("proxy", proxy))


def run_cdf(
    config: Mapping[str, Any], split: str, rewards_path: PathLike, samples_path: PathLike,
    out: PathLike, norm_reference: PathLike | None = None,
) -> None:
    """Per prompt: the M proxy rewards under the ensemble objective, sorted (+ curvefit)."""
    strategies = read_table(samples_path, "samples").column("strategy").unique().to_pylist()
    if strategies != ["random"]:
        raise StageError(
            f"{samples_path}: sampling strategy {strategies} is not i.i.d. sampling from pi_ref; "
            "reward CDFs (and vBoN) need a 'random' reference cache"
        )
    rewards = read_polars(rewards_path, "rewards")
    cfg = config["cdf"]
    ref = read_polars(norm_reference, "rewards") if norm_reference else None
    proxy = ensemble_rewards(rewards, cfg, str(rewards_path), ref)
    m = config["sampling"]["M"][split]
    prompt_ids = sorted(proxy["prompt_id"].unique().to_list())
    check_complete(proxy, prompt_ids, m, str(rewards_path))
    codes = proxy["prompt_id"].cast(pl.Enum(prompt_ids)).to_physical().to_numpy()
    sorted_m = group_sorted_matrix(codes, proxy["proxy"].to_numpy(), len(prompt_ids), m)
    fits = [fit_log_cdf(row) for row in sorted_m] if cfg["curvefit"] else []
    if fits:
        n_bad = sum(not f.ok for f in fits)
        log.info("curvefit: %d/%d prompts fell back to the empirical CDF; median rmse %.4f",
                 n_bad, len(fits), float(np.nanmedian([f.rmse for f in fits])))
    nan = [None] * len(prompt_ids)
    table = pl.DataFrame(
        {
            "prompt_id": prompt_ids,
            "objective": [cfg["objective"]] * len(prompt_ids),
            "n_samples": [m] * len(prompt_ids),
            "sorted_rewards": list(sorted_m),
            "fit_a": [f.a if f.ok else None for f in fits] or nan,
            "fit_b": [f.b if f.ok else None for f in fits] or nan,
            "fit_c": [f.c if f.ok else None for f in fits] or nan,
            "fit_rmse": [f.rmse if f.ok else None for f in fits] or nan,
            "fit_ok": [f.ok for f in fits] or [False] * len(prompt_ids),
        },
        schema_overrides={k: pl.Float64 for k in ("fit_a", "fit_b", "fit_c", "fit_rmse")}
        | {"sorted_rewards": pl.List(pl.Float64), "n_samples": pl.Int32},
    )
    write_table(table, out, "cdf", provenance(
        config, "cdf", split=split, objective=cfg["objective"], uwo_lambda=cfg["uwo_lambda"],
        normalize=cfg["normalize"], curvefit=cfg["curvefit"], M=m))


# ---------------------------------------------------------------------------------------------
# pairs and training
# ---------------------------------------------------------------------------------------------
def run_pairs(
    config: Mapping[str, Any], n: int, samples_path: PathLike, rewards_path: PathLike,
    out: PathLike,
) -> None:
    """Best and worst of the first n cached samples per prompt, by the ensemble proxy."""
    from pipeline_lib.preference import bon_pairs

    samples = read_polars(samples_path, "samples")
    proxy = ensemble_rewards(read_polars(rewards_path, "rewards"), config["cdf"],
                             str(rewards_path))
    pairs, dropped = bon_pairs(samples, proxy, n, return_dropped=True)
    log.info("bon%d pairs: %d prompts, %d dropped (all n proxies tied)", n, pairs.height,
             len(dropped))
    write_table(pairs, out, "pairs", provenance(config, "pairs", n=n,
                                                objective=config["cdf"]["objective"]))


def _policy_log_rows(rows: Sequence[Mapping[str, Any]], method: str) -> pl.DataFrame:
    from pipeline_lib.schemas import SCHEMAS

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


def load_proxy(config: Mapping[str, Any], reward_models: Mapping[str, PathLike],
               train_rewards: PathLike, device):
    """The ensemble proxy of the `cdf` stage, for scoring fresh policy samples."""
    from pipeline_lib.scorers import EnsembleProxy

    cfg = config["cdf"]
    stats = None
    if cfg["normalize"]:
        _, ref, _ = proxy_matrix(read_polars(train_rewards, "rewards"), str(train_rewards))
        stats = member_stats(ref)
    bs = config["scoring"]["batch_size"]
    scorers = [reward_model_scorer(p, name, device, batch_size=bs)
               for name, p in sorted(reward_models.items())]
    return EnsembleProxy(scorers, cfg["objective"], cfg["uwo_lambda"], stats)


def _input_fingerprint(paths: Sequence[PathLike | None]) -> list[list]:
    """(path, size, mtime_ns) of every file of the inputs (directories walked): an input that
    an upstream job rewrote no longer matches a checkpoint made on the old one."""
    out = []
    for p in (Path(p) for p in paths if p is not None):
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            st = f.stat()
            out.append([str(f), st.st_size, st.st_mtime_ns])
    return out


def _checkpoint_guard(checkpoint_dir: Path, settings: Mapping[str, Any],
                      inputs: Sequence[PathLike | None]) -> None:
    """Resume only a checkpoint made by the same settings and inputs; otherwise start afresh
    (the trainers also refuse a checkpoint of another seed, data size or process count)."""
    blob = json.dumps({"settings": settings, "inputs": _input_fingerprint(inputs)},
                      sort_keys=True, default=str)
    marker = checkpoint_dir / "run.json"
    if checkpoint_dir.exists() and (not marker.exists() or marker.read_text() != blob):
        log.warning("checkpoint %s belongs to other settings or inputs; starting afresh",
                    checkpoint_dir)
        shutil.rmtree(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(blob)


def run_train(
    config: Mapping[str, Any],
    name: str,
    policy_dir: PathLike,
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
    ``training.launch.num_processes`` processes under ``accelerate launch``
    (:mod:`pipeline_lib.launch`); otherwise it runs in this process.
    """
    from pipeline_lib.methods import method_runs

    spec = method_runs(config)[name]
    ckpt = Path(checkpoint_dir)
    _checkpoint_guard(ckpt, {"spec": spec, "training": config["training"],
                             "config_hash": config_hash(config)},
                      [policy_dir, prompts_path, cdf_path, rewards_path, pairs_path,
                       *(reward_models or {}).values()])
    _dispatch("train", config, threads, ckpt, name=name, policy_dir=policy_dir, out_dir=out_dir,
              log_table=log_table, checkpoint_dir=ckpt, prompts_path=prompts_path,
              cdf_path=cdf_path, rewards_path=rewards_path, pairs_path=pairs_path,
              reward_models={k: str(v) for k, v in (reward_models or {}).items()})
    _remove_checkpoint(ckpt)


def train_job(
    config: Mapping[str, Any],
    name: str,
    policy_dir: PathLike,
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
    from pipeline_lib.methods import PPO_METHODS, kl_coefficient, method_runs

    spec = method_runs(config)[name]
    method = spec["method"]
    device = _setup(config, threads, "train", name)
    tokenizer = load_tokenizer(policy_dir, "policy")
    policy = load_causal_lm(policy_dir, "cpu", "policy")
    train_seed = derive_seed(config["seed"], "train", name)
    ckpt = Path(checkpoint_dir)
    on_log = lambda r: log.info("%s %s", name, json.dumps(r, default=float))  # noqa: E731
    if method in PPO_METHODS:
        rows, model = _train_ppo_method(config, spec, tokenizer, policy, prompts_path, cdf_path,
                                        rewards_path, reward_models or {}, pairs_path, device,
                                        train_seed, ckpt, on_log)
        extra = {"kl_coef": kl_coefficient(spec)}
    else:
        from pipeline_lib.preference import PreferenceConfig, effective_beta, train_preference

        pairs = read_polars(pairs_path, "pairs")
        pc = PreferenceConfig(
            method=method, beta=float(spec.get("beta") or 0.1), n=int(spec["n"]),
            alpha=float(spec["alpha"]), label_smoothing=float(spec["label_smoothing"]),
            bonbon_variant=spec["bonbon_variant"], device=config["device"],
            **{**config["training"]["preference"], **spec["overrides"]},
        )
        rows, model = train_preference(policy, tokenizer, pairs, pc, seed=train_seed,
                                       checkpoint_dir=ckpt, on_log=on_log)
        extra = {"beta": effective_beta(pc)}
    if not _is_main_process():
        return
    with atomic_dir(out_dir) as tmp:
        save_model(model, tokenizer, tmp)
    write_table(_policy_log_rows(rows, method), log_table, "policy_log",
                provenance(config, "train", run=name, method=method, spec=spec,
                           **_launch_info(config), **extra))


def _train_ppo_method(config, spec, tokenizer, policy, prompts_path, cdf_path, rewards_path,
                      reward_models, pairs_path, device, seed, ckpt, on_log):
    from pipeline_lib.cdf import CurveFit
    from pipeline_lib.methods import kl_coefficient, vbon_rewards
    from pipeline_lib.ppo import PPOConfig, train_ppo

    method = spec["method"]
    prompts = read_polars(prompts_path, "prompts")
    texts = prompts["prompt"].to_list()
    proxy = load_proxy(config, reward_models, rewards_path, device)
    g = config["generation"]
    cfg = PPOConfig.from_mapping({
        **config["training"]["ppo"], **spec["overrides"],
        "kl_coef": kl_coefficient(spec),
        "sft_weight": (1.0 - float(spec["w"])) if method == "bond" else 0.0,
        "temperature": g["temperature"], "top_p": g["top_p"], "top_k": g["top_k"],
        "max_new_tokens": g["max_new_tokens"], "device": config["device"],
    })
    rows_of_prompt = None
    if method in ("vbon", "bond"):
        cdf = read_polars(cdf_path, "cdf")
        by_id = {r["prompt_id"]: r for r in cdf.iter_rows(named=True)}
        missing = [p for p in prompts["prompt_id"] if p not in by_id]
        if missing:
            raise StageError(f"{cdf_path}: no CDF for prompt(s) {missing[:5]}")
        ordered = [by_id[p] for p in prompts["prompt_id"]]
        rows_of_prompt = np.array([r["sorted_rewards"] for r in ordered], dtype=np.float64)
        fits = [CurveFit(r["fit_a"], r["fit_b"], r["fit_c"], r["fit_rmse"], True)
                if r["fit_ok"] else None for r in ordered] if config["cdf"]["curvefit"] else None
        log.info("%s: bound %s, KL coefficient 1/(n-1) = %.4f, exact-bound scale %s",
                 method, spec["bound"], kl_coefficient(spec),
                 "1/(n-1)" if spec["exact_scale"] == "n_minus_1" else "1/n (vBoN code)")

    def reward_fn(idx: np.ndarray, responses: list[str], ids: list[list[int]]) -> np.ndarray:
        r = proxy.score([texts[i] + resp for i, resp in zip(idx, responses, strict=True)])
        if rows_of_prompt is None:
            return r
        return vbon_rewards(rows_of_prompt[idx], r, int(spec["n"]), spec["bound"],
                            spec["exact_scale"], [fits[i] for i in idx] if fits else None)

    sft_examples = None
    if method == "bond":
        from pipeline_lib.modeling import encode_prompt

        pairs = read_polars(pairs_path, "pairs")
        sft_examples = [(encode_prompt(tokenizer, p), list(ids)) for p, ids in
                        zip(pairs["prompt"], pairs["best_token_ids"], strict=True)]
    return train_ppo(policy, tokenizer, texts, reward_fn, cfg, seed=seed, checkpoint_dir=ckpt,
                     sft_examples=sft_examples, on_log=on_log)


# The jobs :func:`_dispatch` runs (and ``python -m pipeline_lib.launch`` runs in each process).
TRAINING_JOBS = {"sft": sft_job, "reward_model": reward_model_job, "train": train_job}
