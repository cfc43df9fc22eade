"""Importing a published reward cache (reference_cache.source: import): the three published
layouts written by hand -> the samples and rewards tables, one clear error per defect, the
config checks, and BoN curves on an imported cache equal to those on the same numbers built
natively."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from polars.testing import assert_frame_equal

from pipeline_lib.io.reference_cache import (
    CacheImportError,
    cache_prompt_id,
    import_cache,
    read_cache_file,
)
from pipeline_lib.io.tables import read_polars, read_provenance, write_table
from pipeline_lib.settings.config import ConfigError, check_config, validate_config
from pipeline_lib.settings.sections import Settings
from pipeline_lib.stages.bon_curve import run_bon_curve
from pipeline_lib.stages.cdf import run_cdf
from pipeline_lib.stages.common import StageError
from pipeline_lib.stages.import_cache import run_import_cache
from pipeline_lib.stages.pairs import run_pairs


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # NaN/Infinity as json writes
    return path


def config(tmp_path: Path, fmt: str, files: dict, m: int = 3, **cache) -> dict:
    cfg = {"task": "imp", "seed": 0, "device": "cpu", "methods": [],
           "sampling": {"M": {"train": m, "test": m}},
           "evaluation": {"bon_ns": [1, 2, 3], "win_rate_n": 2},
           "reference_cache": {"source": "import", "format": fmt,
                               "files": {k: str(v) for k, v in files.items()}, **cache}}
    return validate_config(cfg)


def cache_settings(tmp_path, fmt, **cache):
    dummy = tmp_path / "dummy.jsonl"
    dummy.touch()
    cache.setdefault("proxies", {"r": "reward"})
    return Settings.from_config(config(tmp_path, fmt, {"train": dummy}, **cache)).reference_cache


VBON_SAMPLES = [
    {"prompt": "okay, my", "text": "okay, my only positive thing", "reward": -1.0},
    {"prompt": "I loved", "text": "I loved it", "reward": 2.0},
    {"prompt": "okay, my", "text": "okay, my word", "reward": 0.5},
    {"prompt": "okay, my", "text": " separate text", "reward": 0.5},  # a tie; no prompt prefix
    {"prompt": "I loved", "text": "I loved every minute", "reward": 2.0},
    {"prompt": "I loved", "text": "I loved nothing", "reward": -3.0},
    {"prompt": "I loved", "text": "I loved the fourth", "reward": 9.0},  # beyond M=3: dropped
]


def test_vbon_samples_become_samples_and_rewards_tables(tmp_path):
    path = write_jsonl(tmp_path / "imdb-train-bon-vllm.jsonl", VBON_SAMPLES)
    cfg = cache_settings(tmp_path, "vbon_samples", gold="reward", proxies={"distilbert": "reward"})
    cache = import_cache(read_cache_file(path), cfg, "train", 3, str(path))
    samples = pl.from_arrow(write_and_read(tmp_path, cache))
    okay, loved = cache_prompt_id("train", "okay, my"), cache_prompt_id("train", "I loved")
    assert samples["prompt_id"].to_list() == [okay] * 3 + [loved] * 3  # first-appearance order
    assert samples["sample_idx"].to_list() == [0, 1, 2] * 2
    assert samples["response"].to_list() == [" only positive thing", " word", " separate text",
                                             " it", " every minute", " nothing"]
    assert samples["ref_logprob"].null_count() == samples.height
    assert samples["response_token_ids"].null_count() == samples.height
    assert set(samples["strategy"]) == {"random"}
    rewards = pl.DataFrame(cache.rewards)
    assert rewards.height == 6 * 2  # gold and rm-distilbert: the same column twice
    gold = rewards.filter(pl.col("scorer") == "gold")
    assert gold["reward"].to_list() == [-1.0, 0.5, 0.5, 2.0, 2.0, -3.0]  # ties kept
    assert set(rewards.filter(pl.col("kind") == "proxy")["scorer"]) == {"rm-distilbert"}
    assert cache.truncated == 1 and cache.n_prompts == 2


def write_and_read(tmp_path, cache):
    write_table(cache.samples, tmp_path / "samples.parquet", "samples")
    write_table(cache.rewards, tmp_path / "rewards.parquet", "rewards")
    read_polars(tmp_path / "rewards.parquet", "rewards")
    return read_polars(tmp_path / "samples.parquet", "samples").to_arrow()


def test_prompt_ids_are_stable_and_split_specific():
    a = cache_prompt_id("train", "okay, my")
    assert a == cache_prompt_id("train", "okay, my") and a.startswith("train-")
    assert a != cache_prompt_id("test", "okay, my") != cache_prompt_id("train", "okay, my ")


def test_vbon_prompts_with_and_without_responses(tmp_path):
    rows = [{"prompt": "SUBREDDIT: r/a\nTL;DR:", "rewards": [1.28125, 2.0, 2.0],
             "responses": ["x", "y", "z"]},
            {"prompt": "SUBREDDIT: r/b\nTL;DR:", "rewards": [0, 1, -1, 5]}]  # ints; M+1
    path = write_jsonl(tmp_path / "tldr-sftent-train.jsonl", rows)
    cfg = cache_settings(tmp_path, "vbon_prompts", proxies={"tldr": "rewards"})
    cache = import_cache(read_cache_file(path), cfg, "train", 3, str(path))
    assert cache.samples["response"] == ["x", "y", "z", None, None, None]
    assert cache.rewards["reward"] == [1.28125, 2.0, 2.0, 0.0, 1.0, -1.0]
    assert set(cache.rewards["scorer"]) == {"rm-tldr"} and "gold" not in cache.rewards["kind"]
    write_and_read(tmp_path, cache)
    (tmp_path / "plain.jsonl").write_text(json.dumps({"prompt": "p", "rewards": [1, 2, 3]}))
    cache = import_cache(read_cache_file(tmp_path / "plain.jsonl"), cfg, "train", 3)
    assert cache.samples["response"] == [None] * 3  # responses are optional in this format


ENSEMBLE_ROWS = [
    {"instruction": "Name a colour", "input": "", "answers": ["red", "blue", "green", "grey"],
     "gold_scores": [0.1, 0.7, 0.7, -0.2], "proxy_scores_seed1": [1.0, 2.0, 2.0, 0.0],
     "proxy_scores_seed2": [0.5, 0.5, 1.5, -1.0]},
    {"instruction": "Add", "input": "2 and 2", "answers": ["4", "5", "22", "four"],
     "gold_scores": [1.0, -1.0, -0.5, 0.9], "proxy_scores_seed1": [3.0, 1.0, 0.0, 3.0],
     "proxy_scores_seed2": [2.0, 0.0, 0.0, 2.5]},
]
ENSEMBLE_CACHE = {"prompt_template": "<|prompter|>{instruction}\n{input}<|endoftext|><|assistant|>",
                  "gold": "gold_scores",
                  "proxies": {"seed1": "proxy_scores_seed1", "seed2": "proxy_scores_seed2"}}


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet"])
def test_ensembles_layout_in_each_file_type(tmp_path, kind):
    path = tmp_path / f"gens.{kind}"
    if kind == "jsonl":
        write_jsonl(path, ENSEMBLE_ROWS)
    elif kind == "json":
        path.write_text(json.dumps(ENSEMBLE_ROWS, indent=4))  # the ensembles code's json.dump
    else:
        pq.write_table(pa.Table.from_pylist(ENSEMBLE_ROWS), path)
    cfg = cache_settings(tmp_path, "ensembles", **ENSEMBLE_CACHE)
    cache = import_cache(read_cache_file(path), cfg, "test", 4, str(path))
    prompt = "<|prompter|>Add\n2 and 2<|endoftext|><|assistant|>"
    assert cache.samples["prompt"][4:] == [prompt] * 4
    assert cache.samples["prompt_id"][4] == cache_prompt_id("test", prompt)
    assert cache.samples["response"][:4] == ["red", "blue", "green", "grey"]
    r = pl.DataFrame(cache.rewards)
    assert sorted(set(r["scorer"])) == ["gold", "rm-seed1", "rm-seed2"]
    assert r.filter(pl.col("scorer") == "rm-seed2")["reward"].to_list() == [
        0.5, 0.5, 1.5, -1.0, 2.0, 0.0, 0.0, 2.5]
    write_and_read(tmp_path, cache)


@pytest.mark.parametrize(("fmt", "rows", "cache", "message"), [
    ("vbon_samples", VBON_SAMPLES[:5], {"proxies": {"r": "reward"}},
     "'I loved' (row 1) has 2 samples, fewer than sampling.M.train = 3"),
    ("vbon_samples", [{**r, "reward": float("nan")} if i == 2 else r
                                       for i, r in enumerate(VBON_SAMPLES)], {"proxies": {"r": "reward"}},
     "'okay, my': sample 1 has a non-finite reward nan in field 'reward'"),
    ("vbon_samples", [{k: v for k, v in r.items() if k != "text"} for r in VBON_SAMPLES],
     {"proxies": {"r": "reward"}}, "no field 'text'"),
    ("vbon_samples", [{k: v for k, v in r.items() if k != "reward" or i != 1}
                      for i, r in enumerate(VBON_SAMPLES)], {"proxies": {"r": "reward"}},
     "has no reward in field 'reward'"),
    ("vbon_prompts", [{"prompt": "p", "rewards": [1.0, float("inf"), 2.0]}],
     {"proxies": {"r": "rewards"}}, "non-finite reward inf"),
    ("vbon_prompts", [{"prompt": "p", "rewards": [1.0, 2.0, 3.0]},
                      {"prompt": "p", "rewards": [1.0, 2.0, 3.0]}],
     {"proxies": {"r": "rewards"}}, "is in rows 0 and 1"),
    ("vbon_prompts", [{"prompt": "p", "rewards": [1.0, 2.0, 3.0], "responses": ["a"]}],
     {"proxies": {"r": "rewards"}}, "lists of different lengths"),
    ("ensembles", [{k: v for k, v in r.items() if k != "gold_scores"} for r in ENSEMBLE_ROWS],
     ENSEMBLE_CACHE, "no field 'gold_scores' (reference_cache.gold)"),
    ("ensembles", [{**ENSEMBLE_ROWS[0], "answers": ENSEMBLE_ROWS[0]["answers"][:2],
                    "gold_scores": [1.0] * 2, "proxy_scores_seed1": [1.0] * 2,
                    "proxy_scores_seed2": [1.0] * 2}, ENSEMBLE_ROWS[1]], ENSEMBLE_CACHE,
     "'<|prompter|>Name a colour\\n<|endoftext|><|assistant|>' (row 0) has 2 samples"),
    ("ensembles", ENSEMBLE_ROWS, {**ENSEMBLE_CACHE, "proxies": {"seed3": "proxy_scores_seed3"}},
     "no field 'proxy_scores_seed3' (reference_cache.proxies.seed3)"),
])
def test_each_defect_is_one_clear_error(tmp_path, fmt, rows, cache, message):
    path = write_jsonl(tmp_path / "cache.jsonl", rows)
    cfg = cache_settings(tmp_path, fmt, **cache)
    with pytest.raises(CacheImportError) as err:
        import_cache(read_cache_file(path), cfg, "train", 3, str(path))
    assert message in str(err.value) and str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_non_finite_reward_in_parquet_names_the_prompt(tmp_path):
    rows = [{"prompt": "good", "rewards": [1.0, 2.0]}, {"prompt": "bad one", "rewards": [1.0, math.nan]}]
    path = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    cfg = cache_settings(tmp_path, "vbon_prompts", proxies={"r": "rewards"})
    with pytest.raises(CacheImportError, match=r"prompt test-\w+ 'bad one': sample 1 has a "
                                               r"non-finite reward nan in field 'rewards'"):
        import_cache(read_cache_file(path), cfg, "test", 2, str(path))


# ---------------------------------------------------------------------------------------------
# config checks: before any job runs


def test_import_config_refuses_methods_naming_the_missing_column(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", VBON_SAMPLES)
    base = {"task": "imp", "seed": 0, "reference_cache": {
        "source": "import", "format": "vbon_samples", "files": {"train": str(path)},
        "proxies": {"r": "reward"}}}
    check_config(validate_config({**base, "methods": []}))
    with pytest.raises(ConfigError, match=r"run 'dpo-n8-b0.1' \(method dpo\).*samples column "
                                          r"ref_logprob"):
        validate_config({**base, "methods": [{"method": "dpo", "n": 8, "beta": 0.1}]})
    with pytest.raises(ConfigError, match=r"run 'vbon-n8-exact' \(method vbon\).*ref_logprob"):
        validate_config({**base, "methods": [{"method": "vbon", "n": 8}]})


@pytest.mark.parametrize(("cache", "message"), [
    ({"format": None}, "reference_cache.format is required"),
    ({"files": {}}, "reference_cache.files: no file"),
    ({"files": {"train": "/no/such/file.jsonl"}}, "reference_cache.files.train: '/no/such"),
    ({"proxies": {}}, "reference_cache.proxies is empty"),
    ({"files": {"test": "FILE"}}, "reference_cache.gold is null but files.test is set"),
])
def test_import_config_checks(tmp_path, cache, message):
    path = write_jsonl(tmp_path / "c.jsonl", VBON_SAMPLES)
    rc = {"source": "import", "format": "vbon_samples", "files": {"train": str(path)},
          "proxies": {"r": "reward"}, **cache}
    rc["files"] = {k: (str(path) if v == "FILE" else v) for k, v in rc["files"].items()}
    with pytest.raises(ConfigError, match=message):
        validate_config({"task": "imp", "seed": 0, "methods": [], "reference_cache": rc})


# ---------------------------------------------------------------------------------------------
# stages on an imported cache


def native_tables(tmp_path: Path, gold: np.ndarray, proxies: dict[str, np.ndarray], split: str):
    """The same numbers as a natively sampled cache would hold them."""
    p, m = gold.shape
    ids = [f"{split}-{i}" for i in range(p)]
    rows = [(ids[i], j, "gold", "gold", float(gold[i, j])) for i in range(p) for j in range(m)]
    rows += [(ids[i], j, f"rm-{n}", "proxy", float(v[i, j]))
             for n, v in proxies.items() for i in range(p) for j in range(m)]
    path = tmp_path / f"native-{split}.parquet"
    write_table(pl.DataFrame(rows, schema=["prompt_id", "sample_idx", "scorer", "kind", "reward"],
                             orient="row"), path, "rewards")
    return path


def test_bon_curve_and_cdf_on_an_imported_cache_equal_the_native_ones(tmp_path):
    rng = np.random.default_rng(0)
    p, m = 5, 6
    gold = rng.normal(size=(p, m)).round(1)  # rounded: ties
    proxies = {"seed1": (gold + rng.normal(size=(p, m))).round(1),
               "seed2": rng.integers(0, 3, size=(p, m)).astype(float)}
    rows = [{"instruction": f"q{i}", "input": "", "answers": [f"a{j}" for j in range(m)],
             "gold_scores": gold[i].tolist(), "proxy_scores_seed1": proxies["seed1"][i].tolist(),
             "proxy_scores_seed2": proxies["seed2"][i].tolist()} for i in range(p)]
    files = {s: write_jsonl(tmp_path / f"{s}.jsonl", rows) for s in ("train", "test")}
    cfg = config(tmp_path, "ensembles", files, m=m, **ENSEMBLE_CACHE)
    cfg["cdf"] |= {"objective": "uwo", "normalize": True}
    cfg["evaluation"]["bon_ns"] = [1, 2, 3, 6]
    out = {}
    for split in ("train", "test"):
        out[split] = (tmp_path / f"samples-{split}.parquet", tmp_path / f"rewards-{split}.parquet")
        run_import_cache(cfg, split, files[split], *out[split])
    prov = read_provenance(out["test"][1])
    assert prov["stage"] == "import_cache" and prov["source"] == str(files["test"].resolve())
    run_bon_curve(cfg, out["test"][1], out["train"][1], tmp_path / "bon.parquet")
    native = {s: native_tables(tmp_path, gold, proxies, s) for s in ("train", "test")}
    run_bon_curve(cfg, native["test"], native["train"], tmp_path / "bon-native.parquet")
    imported = read_polars(tmp_path / "bon.parquet", "bon_curve")
    expected = read_polars(tmp_path / "bon-native.parquet", "bon_curve")
    # the prompts' order differs (hash ids vs test-<i>): equal up to float summation order
    assert_frame_equal(imported, expected, check_exact=False, rel_tol=1e-12, abs_tol=1e-12)
    run_cdf(cfg, "train", out["train"][1], out["train"][0], tmp_path / "cdf.parquet",
            out["train"][1])
    cdf = read_polars(tmp_path / "cdf.parquet", "cdf")
    assert cdf.height == p and set(cdf["n_samples"]) == {m}


def test_pairs_refuse_an_imported_cache_naming_the_column(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", VBON_SAMPLES)
    cfg = config(tmp_path, "vbon_samples", {"train": path}, proxies={"r": "reward"})
    run_import_cache(cfg, "train", path, tmp_path / "s.parquet", tmp_path / "r.parquet")
    with pytest.raises(StageError, match="samples column 'ref_logprob' is null"):
        run_pairs(cfg, 2, tmp_path / "s.parquet", tmp_path / "r.parquet", tmp_path / "p.parquet")


def test_the_readme_import_examples_are_valid_configs(tmp_path, monkeypatch):
    """Each config of README's "Bringing a published cache" validates once its files exist."""
    import re

    import yaml

    from pipeline_lib.settings.config import load_config

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text.split("## Bringing a published cache", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```yaml\n(.*?)```", section, re.S)
    assert [yaml.safe_load(b)["reference_cache"]["format"] for b in blocks] == [
        "vbon_samples", "vbon_prompts", "ensembles"]
    monkeypatch.chdir(tmp_path)
    for i, block in enumerate(blocks):
        config = yaml.safe_load(block)
        for f in config["reference_cache"]["files"].values():
            Path(f).parent.mkdir(parents=True, exist_ok=True)
            Path(f).touch()
        path = tmp_path / f"example{i}.yaml"
        path.write_text(yaml.safe_dump(config))
        assert load_config(path)["reference_cache"]["source"] == "import"
