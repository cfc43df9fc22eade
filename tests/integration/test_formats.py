"""The real DAG end to end on named models and datasets, offline: tiny random models of the
papers' architectures loaded by hub id from a hub-layout cache, and tiny datasets on disk as
users have them, one run per prompt format (text_prefix, prompt, hh, messages), each with SFT
or a ready reference policy, trained and pretrained proxies, one PPO-family and one preference
method, evaluation and the summary. Plus the errors a user meets before the first job."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import polars as pl
import pytest
import yaml
from dag_support import snakemake_cmd, snakemake_env
from support.tiny_data import tiny_dataset

from pipeline_lib.io.tables import read_provenance

BASE = {
    "task": "fmt", "seed": 0, "device": "cpu", "threads": 1,
    "prompts": {"n_train": 6, "n_test": 3, "n_pref": 12},
    "sft": {"epochs": 1, "max_steps": 3, "batch_size": 4, "max_length": 128, "eval_every": 0,
            "checkpoint_every": 0},
    "generation": {"max_new_tokens": 6, "batch_size": 32},
    "sampling": {"shards": 1, "M": {"train": 4, "test": 4}},
    "preferences": {"samples_per_prompt": 2},
    "reward_models": {"seeds": [1], "epochs": 1, "batch_size": 4, "max_length": 160},
    "training": {"ppo": {"steps": 2, "rollout_batch_size": 3, "minibatch_size": 3,
                         "ppo_epochs": 1, "checkpoint_every": 0},
                 "preference": {"epochs": 1, "batch_size": 3}},
    "methods": [{"method": "vbon", "n": 2}, {"method": "dpo", "n": 2, "beta": 0.1}],
    "evaluation": {"samples_per_prompt": 2, "bon_ns": [1, 2, 4], "win_rate_n": 2},
}

# format -> (dataset layout, the config's model sections); every model is named by hub id
CASES = {
    # IMDB-style prefixes; GPT-2 fine-tuned by SFT; a DistilBERT sentiment gold (POSITIVE
    # probability); a trained seed and a pretrained one-label DeBERTa reward model
    "text_prefix": ("parquet_folder", {
        "policy": {"base": "tiny-random/gpt2"},
        "gold": {"type": "hf", "model": "tiny-random/distilbert-sst2", "label": "POSITIVE"},
        "reward_models": {"pretrained": [{"name": "deberta",
                                          "model": "tiny-random/deberta-v3-reward"}]}}),
    # TL;DR template with a target column; Pythia fine-tuned; the seed is trained from the
    # Pythia base (not the SFT policy) and reads a text template; a DistilBERT gold read as a
    # text pair (its last label's probability)
    "prompt": ("jsonl", {
        "policy": {"base": "tiny-random/pythia"},
        "gold": {"type": "hf", "model": "tiny-random/distilbert-sst2", "input": "pair"},
        "reward_models": {"base": "tiny-random/pythia", "input": "template",
                          "template": "{prompt} {response}"}}),
    # Anthropic-HH; Pythia as a ready pi_ref (no SFT); the gold reads (prompt, response) as a
    # text pair
    "hh": ("saved", {
        "policy": {"base": "tiny-random/pythia"}, "sft": {"enabled": False},
        "gold": {"type": "hf", "model": "tiny-random/deberta-v3-reward", "input": "pair"}}),
    # chat messages; a Llama chat model as a ready pi_ref with its chat template; the seed reads
    # pairs through the chat template
    "messages": ("hub", {
        "policy": {"base": "tiny-random/llama-chat"}, "sft": {"enabled": False},
        "reward_models": {"input": "chat"}}),
}


def merged(base: dict, extra: dict) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for k, v in extra.items():
        out[k] = {**out.get(k, {}), **v} if isinstance(v, dict) else v
    return out


def run_dag(workdir: Path, config: dict, env: dict, *args: str) -> subprocess.CompletedProcess:
    configfile = workdir / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    return subprocess.run(snakemake_cmd(workdir, *args, configfile=configfile), cwd=workdir,
                          env=snakemake_env(**env), text=True, capture_output=True,
                          timeout=1200)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", list(CASES))
def test_the_dag_runs_on_named_models_and_datasets(fmt, tmp_path, tiny_hub):
    layout, models = CASES[fmt]
    data = tiny_dataset(tmp_path / "data", fmt, layout, hub_cache=tiny_hub.cache)
    config = merged(BASE, {"corpus": data.corpus, **models})
    workdir = tmp_path / "work"
    workdir.mkdir()
    proc = run_dag(workdir, config, {**tiny_hub.env(), **data.env}, "--cores", "2")
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-15000:]
    results = workdir / "results" / "fmt"
    sft_on = config.get("sft", {}).get("enabled", True)
    assert (results / "models" / "sft").exists() == sft_on

    summary = pl.read_parquet(results / "summary.parquet")
    assert {"sft", "vbon-n2-exact", "dpo-n2-b0.1"} <= set(summary["policy"].to_list())
    assert summary.filter(pl.col("policy") != "sft")["gold"].is_finite().all()

    # the prompts of each format, from the dataset's own train/test splits
    prompts = pl.read_parquet(results / "data" / "prompts-train.parquet")["prompt"].to_list()
    test_prompts = pl.read_parquet(results / "data" / "prompts-test.parquet")["prompt"].to_list()
    assert not set(prompts) & set(test_prompts)
    if fmt == "hh":
        assert all(p.endswith("\n\nAssistant:") and "\n\nHuman:" in p for p in prompts)
    if fmt == "prompt":
        assert all(p.startswith("SUBREDDIT: r/") and p.endswith("TL;DR:") for p in prompts)

    # provenance names the hub snapshot (commit) of the models behind the tables
    policy_id = models["policy"]["base"]
    if not sft_on:  # pi_ref is the hub model itself: its commit is recorded
        prov = read_provenance(results / "samples" / "train.parquet")
        assert prov["sampled_with"]["policy.base"]["snapshot"] == \
            tiny_hub.commits[policy_id]["main"]
    members = set(pl.read_parquet(results / "rewards" / "train.parquet")["scorer"].to_list())
    expected = {"gold", "rm-seed1"} | {f"rm-{p['name']}" for p in
                                       models.get("reward_models", {}).get("pretrained", [])}
    assert members == expected
    if fmt == "messages":
        _check_chat_encoding(results, policy_id)


def _check_chat_encoding(results: Path, policy_id: str) -> None:
    """The cached reference log-probs were computed on chat-template prompts: recompute one
    sample's log-prob with the model loaded by id and the shared prompt encoder."""
    import torch

    from pipeline_lib.models.encoding import encode_prompt, uses_chat_template
    from pipeline_lib.models.loading import load_causal_lm, load_tokenizer

    tok, model = load_tokenizer(policy_id), load_causal_lm(policy_id)
    assert uses_chat_template(tok)
    row = pl.read_parquet(results / "samples" / "train.parquet").row(0, named=True)
    prompt_ids = encode_prompt(tok, row["prompt"])
    assert tok.decode(prompt_ids).startswith("<|im_start|>user")
    ids = prompt_ids + row["response_token_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    manual = sum(float(logp[t - 1, ids[t]]) for t in range(len(prompt_ids), len(ids)))
    assert row["ref_logprob"] == pytest.approx(manual, abs=1e-3)


def test_a_hub_model_missing_offline_fails_before_the_first_job(tmp_path, tiny_hub_cache):
    """A real run checks every named model first: a hub id not in the cache while offline is
    one line naming the key, the id and the download command, and no job runs; a dry run plans
    without any model file."""
    config = merged(BASE, {"policy": {"base": "someone/not-downloaded"},
                           "sft": {"enabled": False}})
    workdir = tmp_path / "work"
    workdir.mkdir()
    env = tiny_hub_cache.env()
    dry = run_dag(workdir, config, env, "-n")
    assert dry.returncode == 0, dry.stderr[-3000:]
    proc = run_dag(workdir, config, env, "--cores", "1")
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    line = next(x for x in out.splitlines() if "someone/not-downloaded" in x)
    assert "policy.base" in line and "hf download someone/not-downloaded" in line
    assert not (workdir / "results").exists()


def test_a_constant_gold_scorer_fails_before_the_first_job(tmp_path, tiny_hub_cache):
    """`output: probability` on a one-label model scores every text 1.0: refused up front."""
    config = merged(BASE, {"gold": {"type": "hf", "model": "tiny-random/deberta-v3-reward",
                                    "output": "probability"}})
    workdir = tmp_path / "work"
    workdir.mkdir()
    proc = run_dag(workdir, config, tiny_hub_cache.env(), "--cores", "1")
    assert proc.returncode != 0
    assert "gold.output" in proc.stdout + proc.stderr
    assert not (workdir / "results").exists()


def test_a_local_reference_policy_is_an_input_of_its_readers(tmp_path):
    """With SFT off and policy.base a local directory, its files are inputs of every rule that
    loads pi_ref (editing them reruns those rules); no `sft` job is planned."""
    from test_dag import dry_run, inputs_of, planned_jobs, write_config

    base = tmp_path / "base"
    base.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (base / name).write_text("{}")
    config = merged(BASE, {"policy": {"base": str(base)}, "sft": {"enabled": False}})
    workdir = tmp_path / "work"
    workdir.mkdir()
    jobs = planned_jobs(dry_run(workdir, configfile=write_config(tmp_path / "c.yaml", config)))
    assert "sft" not in {j["rule"] for j in jobs}
    readers = {"preferences", "sample", "train", "evaluate"}
    for job in jobs:
        has = str(base / "config.json") in inputs_of(job)
        assert has == (job["rule"] in readers | {"reward_model"}), job
    assert os.path.isdir(base)
