"""Stage-level behaviour on a tiny model: sharding, reference log-probs, bad inputs."""

import os

import numpy as np
import polars as pl
import pytest
import torch

from pipeline_lib.generation.hf import sequence_logprobs
from pipeline_lib.generation.sampling import prompt_groups, shard_groups, trim_at_eos
from pipeline_lib.io.schemas import SchemaError
from pipeline_lib.io.tables import read_polars, write_table
from pipeline_lib.models.encoding import encode_prompt
from pipeline_lib.settings.sections import Settings
from pipeline_lib.stages.cdf import run_cdf
from pipeline_lib.stages.common import StageError
from pipeline_lib.stages.generate import generate_table, make_backend
from pipeline_lib.stages.reward_cache import check_complete
from pipeline_lib.stages.sample import shard_group_starts


def prompts_frame(n):
    return pl.DataFrame({
        "prompt_id": [f"train-{i:05d}" for i in range(n)],
        "split": ["train"] * n,
        "prompt": ["a great", "the plot is", "boring", "i loved", "funny and"][:n],
        "text_id": [f"t{i}" for i in range(n)],
        "group": ["g"] * n,
        "n_words": [2] * n,
        "preference": [None] * n,
    }, schema_overrides={"preference": pl.String, "n_words": pl.Int32})


def test_groups_and_shards_partition_prompts():
    groups = prompt_groups(10, m=4, batch_size=12)  # 3 prompts per group
    assert [list(g) for g in groups] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    for n_shards in (1, 2, 3, 4):
        covered = [i for s in range(n_shards) for g in shard_groups(groups, n_shards, s) for i in g]
        assert covered == list(range(10))
    with pytest.raises(ValueError, match="out of range"):
        shard_groups(groups, 2, 2)


def test_responses_are_cut_after_eos_and_keep_sampled_pad_ids():
    eos, pad = 0, 1
    assert trim_at_eos([5, pad, 7], eos) == [5, pad, 7]  # unfinished: a sampled PAD stays
    assert trim_at_eos([5, pad, eos, pad, pad], eos) == [5, pad, eos]  # generate's padding goes
    assert trim_at_eos([eos, 5, eos], eos) == [eos]
    assert trim_at_eos([5, 6], None) == [5, 6]


def test_samples_do_not_depend_on_sharding(tiny_policy_dir, config):
    config["generation"]["batch_size"] = 8  # 2 prompts per group at M=4
    prompts = prompts_frame(5)
    g = Settings.from_config(config).generation
    backend = make_backend(Settings.from_config(config), tiny_policy_dir, "cpu")
    whole = generate_table(backend, prompts, None, 4, g, config["seed"], "train")
    parts = [generate_table(backend, prompts, shard_group_starts(5, 4, g.batch_size, 2, s), 4,
                            g, config["seed"],
                            "train") for s in range(2)]
    assert pl.concat(parts).equals(whole)
    check_complete(whole, prompts["prompt_id"].to_list(), 4, "test")
    assert (whole["n_tokens"] == whole["response_token_ids"].list.len()).all()
    assert (whole["n_tokens"] <= config["generation"]["max_new_tokens"]).all()


def test_reference_logprob_matches_manual_forward(tiny_policy_dir, config):
    g = Settings.from_config(config).generation
    backend = make_backend(Settings.from_config(config), tiny_policy_dir, "cpu")
    table = generate_table(backend, prompts_frame(2), None, 3, g, config["seed"], "train")
    tok, model = backend.tokenizer, backend.model
    row = table.row(4, named=True)
    ids = encode_prompt(tok, row["prompt"]) + row["response_token_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
    start = len(ids) - len(row["response_token_ids"])
    manual = sum(float(logp[t - 1, ids[t]]) for t in range(start, len(ids)))
    assert row["ref_logprob"] == pytest.approx(manual, abs=1e-4)
    # batched with padding gives the same values as one-by-one
    one = sequence_logprobs(model, [encode_prompt(tok, row["prompt"])],
                            [row["response_token_ids"]], tok.pad_token_id)
    assert one[0] == pytest.approx(row["ref_logprob"], abs=1e-4)


def test_check_complete_errors():
    t = pl.DataFrame({"prompt_id": ["a", "a", "b"], "sample_idx": [0, 1, 0]})
    with pytest.raises(StageError, match="prompt b has 1 samples, expected M=2"):
        check_complete(t, ["a", "b"], 2, "x")
    dup = pl.DataFrame({"prompt_id": ["a", "a"], "sample_idx": [0, 0]})
    with pytest.raises(StageError, match=r"\(prompt a, sample 0\) appears more than once"):
        check_complete(dup, ["a"], 2, "x")


def _cache(tmp_path, m=4, n_prompts=3, strategy="random", drop_last=False, value=None):
    rng = np.random.default_rng(0)
    keys = [(f"p{i}", j) for i in range(n_prompts) for j in range(m)]
    if drop_last:
        keys = keys[:-1]
    rows = []
    for scorer, kind in (("gold", "gold"), ("rm-seed1", "proxy"), ("rm-seed2", "proxy")):
        for pid, j in keys:
            rows.append((pid, j, scorer, kind, float(rng.normal())))
    rewards = pl.DataFrame(rows, schema=["prompt_id", "sample_idx", "scorer", "kind", "reward"],
                           orient="row")
    if value is not None:
        rewards = rewards.with_columns(pl.lit(value).alias("reward"))
    samples = pl.DataFrame({
        "prompt_id": [k[0] for k in keys], "sample_idx": [k[1] for k in keys],
        "prompt": ["x"] * len(keys), "response": ["y"] * len(keys),
        "response_token_ids": [[1, 2]] * len(keys), "n_tokens": [2] * len(keys),
        "finished": [True] * len(keys), "ref_logprob": [-1.0] * len(keys),
        "strategy": [strategy] * len(keys), "layer": [0] * len(keys),
        "parent_idx": [-1] * len(keys),
    })
    rp, sp = tmp_path / "rewards.parquet", tmp_path / "samples.parquet"
    write_table(samples, sp, "samples")
    try:
        write_table(rewards, rp, "rewards")
    except SchemaError:
        import pyarrow.parquet as pq
        pq.write_table(rewards.to_arrow(), rp)  # a foreign writer that skips validation
    return rp, sp


def test_cdf_stage_sorted_ensemble(tmp_path, config):
    config["sampling"]["M"]["train"] = 4
    config["cdf"].update(objective="wco", normalize=False, curvefit=False)
    rp, sp = _cache(tmp_path)
    out = tmp_path / "cdf.parquet"
    run_cdf(config, "train", rp, sp, out)
    cdf = read_polars(out, "cdf")
    rewards = read_polars(rp, "rewards").filter(pl.col("kind") == "proxy")
    wco = rewards.group_by("prompt_id", "sample_idx").agg(pl.col("reward").min())
    for row in cdf.iter_rows(named=True):
        expected = sorted(wco.filter(pl.col("prompt_id") == row["prompt_id"])["reward"])
        assert row["sorted_rewards"] == pytest.approx(expected)
        assert row["n_samples"] == 4 and row["objective"] == "wco"


def test_cdf_refuses_prs_cache(tmp_path, config):
    config["sampling"]["M"]["train"] = 4
    rp, sp = _cache(tmp_path, strategy="prs")
    with pytest.raises(StageError, match="not i.i.d. sampling from pi_ref"):
        run_cdf(config, "train", rp, sp, tmp_path / "cdf.parquet")
    assert not (tmp_path / "cdf.parquet").exists()


def test_cdf_refuses_short_prompt_and_nan(tmp_path, config):
    config["sampling"]["M"]["train"] = 4
    config["cdf"]["normalize"] = False
    rp, sp = _cache(tmp_path, drop_last=True)
    with pytest.raises(StageError, match="prompt p2 has 3 samples, expected M=4"):
        run_cdf(config, "train", rp, sp, tmp_path / "cdf.parquet")
    rp, sp = _cache(tmp_path, value=float("nan"))
    with pytest.raises(SchemaError, match="rewards.parquet: column 'reward' has 36 non-finite"):
        run_cdf(config, "train", rp, sp, tmp_path / "cdf.parquet")
    assert not (tmp_path / "cdf.parquet").exists()


def test_prs_strategy_cache_records_layers_and_is_refused_by_cdf(tiny_policy_dir, config,
                                                                 tmp_path):
    """sampling.strategy: prs builds M-sample trees (layer, parent) guided by the proxy RMs;
    the cdf stage then refuses the cache because PRS samples are not draws from pi_ref."""
    from transformers import AutoModelForSequenceClassification

    from pipeline_lib.models.loading import load_tokenizer, save_model
    from pipeline_lib.stages.sample import run_sample_shard

    rm = AutoModelForSequenceClassification.from_pretrained(tiny_policy_dir, num_labels=1)
    tok = load_tokenizer(tiny_policy_dir)
    rm.config.pad_token_id = tok.pad_token_id
    save_model(rm, tok, tmp_path / "rm")
    config["sampling"].update(strategy="prs", shards=1, M={"train": 4, "test": 4})
    config["generation"].update(max_new_tokens=6, batch_size=8)
    config["prs"].update(first_template="{instruction}", feedback_template="{answer} so",
                         refine_template="{feedback} {answer}", feedback_max_new_tokens=4)
    prompts = prompts_frame(3)
    write_table(prompts, tmp_path / "prompts.parquet", "prompts")
    out = tmp_path / "shard.parquet"
    run_sample_shard(config, "train", 0, tiny_policy_dir, tmp_path / "prompts.parquet", out,
                     reward_models={"rm-seed1": tmp_path / "rm"})
    samples = read_polars(out, "samples")
    check_complete(samples, prompts["prompt_id"].to_list(), 4, "prs")
    assert set(samples["strategy"]) == {"prs"}
    assert samples.filter(pl.col("sample_idx") < 2)["layer"].to_list() == [0] * 6
    second = samples.filter(pl.col("sample_idx") >= 2)
    assert second["layer"].to_list() == [1] * 6
    assert second["parent_idx"].is_in([0, 1]).all()  # each refines a layer-0 response
    assert samples["ref_logprob"].is_finite().all()
    rp, _ = _cache(tmp_path, m=4)
    with pytest.raises(StageError, match="not i.i.d. sampling from pi_ref"):
        run_cdf(config, "train", rp, out, tmp_path / "cdf.parquet")


def test_checkpoint_guard_keeps_only_a_checkpoint_of_the_same_settings_and_inputs(tmp_path):
    from pipeline_lib.io.guard import checkpoint_guard

    table = tmp_path / "pairs.parquet"
    table.write_bytes(b"x")
    model = tmp_path / "sft"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"w")
    ckpt = tmp_path / "ckpt"
    checkpoint_guard(ckpt, {"lr": 1}, [table, model, None])
    (ckpt / "last").mkdir()
    checkpoint_guard(ckpt, {"lr": 1}, [table, model, None])
    assert (ckpt / "last").exists()  # same settings and inputs: resumable
    checkpoint_guard(ckpt, {"lr": 2}, [table, model])
    assert ckpt.exists() and not (ckpt / "last").exists()  # other settings: afresh
    (ckpt / "last").mkdir()
    os.utime(model / "model.safetensors", ns=(1, 1))  # an upstream job rewrote an input
    checkpoint_guard(ckpt, {"lr": 2}, [table, model])
    assert not (ckpt / "last").exists()
