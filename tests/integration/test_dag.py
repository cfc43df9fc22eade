"""The real Snakemake DAG on the tiny config: tables, no-op rerun, single targets, what reruns
when a setting changes, benchmarks; and, in dry runs (fast), the declared inputs, local rules
and wildcard constraints.

Runs `snakemake` as users do (a subprocess), in temporary working directories. The full DAG
runs once per session (the `tiny_dag` fixture of conftest.py); test_slurm.py compares a SLURM
run of the same config with it, table by table (the same config and seed must give identical
tables), and a unit test (tests/unit/test_stages.py) that samples do not depend on the shard
count.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import yaml
from dag_support import ROOT, TINY, snakemake_cmd, snakemake_env

from pipeline_lib.io.schemas import SCHEMAS
from pipeline_lib.io.tables import read_polars, read_provenance
from pipeline_lib.math.cdf import empirical_cdf

pytestmark = pytest.mark.integration
slow = pytest.mark.slow  # reads the full tiny DAG's results (or runs more of it)

TABLES = {
    "data/prompts-train.parquet": "prompts",
    "data/prompts-test.parquet": "prompts",
    "data/prompts-pref.parquet": "prompts",
    "data/preferences.parquet": "preferences",
    "samples/train.parquet": "samples",
    "samples/test.parquet": "samples",
    "rewards/train.parquet": "rewards",
    "rewards/test.parquet": "rewards",
    "cdf/train.parquet": "cdf",
    "cdf/test.parquet": "cdf",
    "logs/sft.parquet": "train_log",
    "logs/rm-seed1.parquet": "train_log",
    "data/bon4-pairs.parquet": "pairs",
    "eval/bon.parquet": "bon_curve",
    "eval/policy-sft.parquet": "eval_samples",
    "eval/policy-vbon-n4-exact.parquet": "eval_samples",
    "summary.parquet": "eval_summary",
    "frontier.parquet": "frontier",
    "data/prs-instructions.parquet": "prompts",
    "prs/samples.parquet": "prs_samples",
    "prs/compare.parquet": "prs_compare",
}
RUNS = ["ppo-b0.05", "vbon-n4-exact", "vbon-n4-l1", "bond-n4-w0.5", "dpo-n4-b0.1", "ipo-n4-b0.1",
        "bonbon-n4", "bon_sft-n4"]
TABLES |= {f"logs/train-{r}.parquet": "policy_log" for r in RUNS}


# The GPU rules (benchmarked) and the local rules (tiny CPU jobs, never cluster jobs).
GPU_RULES = {"sft", "preferences", "reward_model", "sample", "score", "train", "evaluate",
             "prs_compare"}
LOCAL_RULES = {"prompts", "gather_samples", "cdf", "pairs", "bon_curve", "frontier", "summary",
               "prs_instructions"}


def snakemake(workdir: Path, *args: str, configfile: Path = TINY, check: bool = True):
    cmd = snakemake_cmd(workdir, "--cores", "2", *args, configfile=configfile)
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, env=snakemake_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def run(tiny_dag) -> Path:
    """results/tiny of the session's full tiny DAG."""
    return tiny_dag.wait()


def cfg() -> dict:
    return yaml.safe_load(TINY.read_text())


@slow
def test_every_table_matches_its_schema(run):
    for rel, schema in TABLES.items():
        frame = read_polars(run / rel, schema)
        assert frame.height > 0, rel
        assert read_provenance(run / rel)["config_hash"], rel
    for d in ("models/sft", "models/rm-seed1", "models/rm-seed2"):
        assert (run / d / "model.safetensors").exists()
        assert (run / d / "config.json").exists()


@slow
def test_prompt_splits_are_disjoint_by_group(run):
    train = read_polars(run / "data/prompts-train.parquet", "prompts")
    test = read_polars(run / "data/prompts-test.parquet", "prompts")
    pref = read_polars(run / "data/prompts-pref.parquet", "prompts")
    c = cfg()["prompts"]
    assert (train.height, test.height, pref.height) == (c["n_train"], c["n_test"], c["n_pref"])
    assert set(train["group"]).isdisjoint(set(test["group"]))
    assert set(pref["text_id"]).isdisjoint(set(train["text_id"]))
    assert train["n_words"].min() >= 2 and train["n_words"].max() <= 8


@slow
def test_reward_cache_is_long_format_one_row_per_prompt_sample_scorer(run):
    samples = read_polars(run / "samples/train.parquet", "samples")
    rewards = read_polars(run / "rewards/train.parquet", "rewards")
    m, n_prompts = cfg()["sampling"]["M"]["train"], cfg()["prompts"]["n_train"]
    assert samples.height == m * n_prompts
    assert sorted(samples["sample_idx"].unique()) == list(range(m))
    assert (samples["ref_logprob"] < 0).all()
    assert sorted(rewards["scorer"].unique()) == ["gold", "rm-seed1", "rm-seed2"]
    assert rewards.height == samples.height * 3
    assert not rewards.select("prompt_id", "sample_idx", "scorer").is_duplicated().any()
    # the gold reward is VADER's compound score of prompt + response
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    vader = SentimentIntensityAnalyzer()
    row = samples.row(5, named=True)
    gold = rewards.filter((pl.col("scorer") == "gold") & (pl.col("prompt_id") == row["prompt_id"])
                          & (pl.col("sample_idx") == row["sample_idx"]))["reward"][0]
    assert gold == pytest.approx(vader.polarity_scores(row["prompt"] + row["response"])["compound"])


@slow
def test_cdf_is_the_sorted_normalised_uwo_ensemble(run):
    """Recompute the tiny config's objective (UWO, lambda 0.5, z-normalised by the train
    cache) independently from the reward cache and compare."""
    train = read_polars(run / "rewards/train.parquet", "rewards").filter(pl.col("kind") == "proxy")
    stats = train.group_by("scorer").agg(pl.col("reward").mean().alias("mu"),
                                         pl.col("reward").std(ddof=0).alias("sd"))
    for split in ("train", "test"):
        rewards = read_polars(run / f"rewards/{split}.parquet", "rewards").filter(
            pl.col("kind") == "proxy")
        z = rewards.join(stats, on="scorer").with_columns(
            ((pl.col("reward") - pl.col("mu")) / pl.col("sd")).alias("z"))
        uwo = z.group_by("prompt_id", "sample_idx").agg(
            (pl.col("z").mean() - 0.5 * pl.col("z").var(ddof=0)).alias("u"))
        cdf = read_polars(run / f"cdf/{split}.parquet", "cdf")
        assert cdf.height == cfg()["prompts"][f"n_{split}"]
        for row in cdf.iter_rows(named=True):
            expected = np.sort(uwo.filter(pl.col("prompt_id") == row["prompt_id"])["u"].to_numpy())
            np.testing.assert_allclose(row["sorted_rewards"], expected, atol=1e-9)
            assert row["objective"] == "uwo" and row["n_samples"] == 8
            if row["fit_ok"]:  # curvefit: true in the tiny config
                assert row["fit_rmse"] >= 0
        s = np.array(cdf["sorted_rewards"][0])
        assert np.all(np.diff(s) >= 0)
        assert empirical_cdf(s, s[-1:])[0] <= 1.0


@slow
def test_logs_have_progress_and_losses(run):
    log = (run / "logs/sft.log").read_text()
    assert "sft:" in log and "job sft finished" in log  # tqdm bar and the job summary
    assert "sample train" in (run / "logs/sample-train-0.log").read_text()
    rm = read_polars(run / "logs/rm-seed1.parquet", "train_log")
    assert set(rm["split"]) == {"train", "val"}
    sft = read_polars(run / "logs/sft.parquet", "train_log").filter(pl.col("split") == "train")
    assert sft["loss"][-1] < sft["loss"][0]  # training moved the loss
    # checkpoints were written (tiny.yaml: every 10 SFT steps) and removed at the end
    assert "checkpoint at step 20 saved in" in log
    assert not (run / "checkpoints/sft").exists() and not (run / "checkpoints/rm-seed1").exists()


@slow
def test_every_method_trains_and_its_loss_moves(run):
    for name in RUNS:
        log = read_polars(run / f"logs/train-{name}.parquet", "policy_log")
        assert log.height >= 4, name
        assert log["loss"].n_unique() > 1, f"{name}: the loss never moved"
        assert log["kl_estimator"].is_in(["k1_rollout", "logratio_cached_best"]).all()
        assert (run / f"policies/{name}/model.safetensors").exists()
        assert not (run / f"checkpoints/{name}").exists()  # removed once the run completed
    ppo = read_polars(run / "logs/train-vbon-n4-exact.parquet", "policy_log")
    assert ppo["kl_coef"].to_list() == pytest.approx([1 / 3] * ppo.height)  # beta = 1/(n-1)
    assert ppo["reward"].is_not_null().all() and ppo["entropy"].is_not_null().all()


def _matrix(frame: pl.DataFrame, value: str, columns: str) -> np.ndarray:
    """(prompts, samples) matrix of ``value``, prompts sorted by id, samples by ``columns``."""
    return (frame.sort("prompt_id", columns).group_by("prompt_id", maintain_order=True)
            .agg(pl.col(value)).sort("prompt_id")[value].to_list())


@slow
def test_summary_values_of_every_policy_recomputed_from_its_samples(run):
    """gold, proxy, KL (k1 and its SE), k3 and both win rates of each policy, recomputed by
    hand from eval/policy-*.parquet and the test reward cache (brute force: every pair of a
    policy sample and a held-out judge, the first M // 4 = 2 reference samples of each prompt;
    the reference's best of all M = 8 by the trained ensemble: UWO, lambda 0.5, members
    z-normalised on the train cache; ties averaged); and the BoN points' win rates: every
    n-subset of the 6 non-judge samples, its proxy-best against the same judges."""
    summary = read_polars(run / "summary.parquet", "eval_summary")
    test = read_polars(run / "rewards/test.parquet", "rewards")
    train = read_polars(run / "rewards/train.parquet", "rewards")
    ref_gold = np.array(_matrix(test.filter(pl.col("kind") == "gold"), "reward", "sample_idx"))
    members = []
    for name in ("rm-seed1", "rm-seed2"):
        ref = train.filter(pl.col("scorer") == name)["reward"].to_numpy()
        x = np.array(_matrix(test.filter(pl.col("scorer") == name), "reward", "sample_idx"))
        members.append((x - ref.mean()) / ref.std())
    z = np.stack(members)
    ref_proxy = z.mean(axis=0) - 0.5 * z.var(axis=0)
    best = ref_proxy == ref_proxy.max(axis=1, keepdims=True)  # the best of all 8 (ties)
    judges = ref_gold[:, :2]  # the held-out judges of every win_rate_ref
    for name in ["sft", *RUNS]:
        s = read_polars(run / f"eval/policy-{name}.parquet", "eval_samples")
        row = summary.filter(pl.col("policy") == name).row(0, named=True)
        gold, diff = s["gold"].to_numpy(), (s["logp_policy"] - s["logp_ref"]).to_numpy()
        assert row["gold"] == pytest.approx(gold.mean(), abs=1e-12)
        assert row["gold_se"] == pytest.approx(gold.std(ddof=1) / np.sqrt(gold.size), abs=1e-12)
        assert row["proxy"] == pytest.approx(s["proxy"].mean(), abs=1e-12)
        assert row["kl"] == pytest.approx(diff.mean(), abs=1e-12)
        assert row["kl_se"] == pytest.approx(diff.std(ddof=1) / np.sqrt(diff.size), abs=1e-12)
        assert row["kl_k3"] == pytest.approx(s["k3_sum"].sum() / s["n_tokens"].sum(), abs=1e-12)
        pol = np.array(_matrix(s, "gold", "sample_idx"))  # (P, K)
        vs = (pol[:, :, None] > judges[:, None, :]) + 0.5 * (pol[:, :, None] == judges[:, None, :])
        assert row["win_rate_ref"] == pytest.approx(vs.mean(), abs=1e-12)
        vs = (pol[:, :, None] > ref_gold[:, None, :]) + 0.5 * (pol[:, :, None] == ref_gold[:, None, :])
        vs_best = (vs * best[:, None, :]).sum(axis=2) / best.sum(axis=1)[:, None]
        assert row["win_rate_bon"] == pytest.approx(vs_best.mean(), abs=1e-12)
        assert row["win_rate_n"] == 8 and row["win_rate_judges"] == 2
    for n in (1, 2, 4, 8):
        row = summary.filter(pl.col("policy") == f"bon-n{n}").row(0, named=True)
        assert row["win_rate_judges"] == 2
        if n > 6:  # more than the non-judge samples: no win rate
            assert row["win_rate_ref"] is None
            continue
        per_prompt = []
        for proxy_row, gold_row, judge_row in zip(ref_proxy, ref_gold, judges, strict=True):
            wins = []
            for subset in itertools.combinations(range(2, 8), n):
                top = max(proxy_row[j] for j in subset)
                sel = [j for j in subset if proxy_row[j] == top]
                wins.append(np.mean([np.mean((gold_row[j] > judge_row)
                                             + 0.5 * (gold_row[j] == judge_row)) for j in sel]))
            per_prompt.append(np.mean(wins))
        assert row["win_rate_ref"] == pytest.approx(np.mean(per_prompt), abs=1e-12), n


@slow
def test_pairs_are_best_and_worst_of_first_n(run):
    pairs = read_polars(run / "data/bon4-pairs.parquet", "pairs")
    assert (pairs["best_idx"] < 4).all() and (pairs["worst_idx"] < 4).all()
    assert (pairs["best_proxy"] > pairs["worst_proxy"]).all()


@slow
def test_evaluation_summary_and_figures(run):
    summary = read_polars(run / "summary.parquet", "eval_summary")
    policies = set(summary["policy"])
    assert {"sft", *RUNS} <= policies
    assert {"bon-n1", "bon-n2", "bon-n4", "bon-n8"} <= policies
    sft = summary.filter(pl.col("policy") == "sft").row(0, named=True)
    assert sft["kl"] == pytest.approx(0.0, abs=1e-9)  # the reference against itself
    assert summary["pareto"].any()
    assert summary.filter(pl.col("method") != "bon")["win_rate_bon"].is_not_null().all()
    bon = read_polars(run / "eval/bon.parquet", "bon_curve")
    assert set(bon["objective"]) == {"rm-seed1", "rm-seed2", "mean", "wco", "uwo"}
    # n = 1 is a uniform non-judge sample, whatever the objective: its win rate against the
    # held-out judges (M // 4 = 2 per prompt) is the plain one; n = 8 > 6 has none
    test = read_polars(run / "rewards/test.parquet", "rewards").filter(pl.col("kind") == "gold")
    gold = np.array(_matrix(test, "reward", "sample_idx"))
    pool, judges = gold[:, 2:, None], gold[:, None, :2]
    n1 = bon.filter(pl.col("n") == 1)
    assert n1["win_rate_ref"].to_list() == pytest.approx(
        [((pool > judges) + 0.5 * (pool == judges)).mean()] * n1.height, abs=1e-12)
    assert bon.filter(pl.col("n") == 8)["win_rate_ref"].is_null().all()
    assert set(bon["win_rate_judges"]) == {2}
    assert (bon["kl_ties"] <= bon["kl_analytic"] + 1e-12).all()
    samples = read_polars(run / "eval/policy-sft.parquet", "eval_samples")
    assert samples.height == cfg()["prompts"]["n_test"] * 8
    # budget: PPO runs drew rollout_batch_size samples per logged step, each scored by both
    # seeds; vbon read the whole train cache, dpo the first n of each train prompt
    c = cfg()
    for name in ("ppo-b0.05", "vbon-n4-exact"):
        log = read_polars(run / f"logs/train-{name}.parquet", "policy_log")
        row = summary.filter(pl.col("policy") == name).row(0, named=True)
        batch = c["training"]["ppo"]["rollout_batch_size"]
        assert row["train_steps"] == log.height == c["training"]["ppo"]["steps"]
        assert row["policy_samples"] == log.height * batch
        assert row["reward_model_calls"] == log.height * batch * 2
        assert row["tokens_generated"] == round(log["response_length"].sum() * batch)
        assert row["train_wall_s"] == log["elapsed_s"].max()
    m_train, n_train = c["sampling"]["M"]["train"], c["prompts"]["n_train"]
    by_name = {r["policy"]: r for r in summary.iter_rows(named=True)}
    assert by_name["vbon-n4-exact"]["reference_samples"] == n_train * m_train
    assert by_name["ppo-b0.05"]["reference_samples"] == 0
    assert by_name["dpo-n4-b0.1"]["reference_samples"] == n_train * 4
    assert by_name["dpo-n4-b0.1"]["policy_samples"] == 0
    assert by_name["bon-n4"]["reference_samples"] == 4 * c["prompts"]["n_test"]
    assert by_name["sft"]["train_steps"] is None
    # the frontier: one sweep per entry (tiny has no lists: one point each, one seed)
    frontier = read_polars(run / "frontier.parquet", "frontier")
    assert set(frontier["sweep"]) == set(RUNS) and set(frontier["n_points"]) == {1}
    assert set(frontier["metric"]) == {"gold", "win_rate"}
    for fig in ("bon_curves", "kl_gold", "win_rates", "kl_win_rate"):
        assert (run / f"figures/{fig}.png").stat().st_size > 10_000


@slow
def test_prs_comparison_runs_end_to_end(run):
    samples = read_polars(run / "prs/samples.parquet", "prs_samples")
    n = cfg()["prs_compare"]["n_prompts"]
    for strategy in ("random", "prs"):
        part = samples.filter(pl.col("strategy") == strategy)
        assert part.height == n * 4
    prs = samples.filter(pl.col("strategy") == "prs")
    assert sorted(prs["layer"].unique()) == [0, 1]
    assert (prs.filter(pl.col("layer") == 1)["parent_idx"] < 2).all()
    assert prs["extra_tokens"].sum() > 0  # the reflection costs tokens
    compare = read_polars(run / "prs/compare.parquet", "prs_compare")
    assert set(compare["strategy"]) == {"random", "prs"}
    tokens = dict(zip(compare["strategy"], compare["tokens_per_prompt"], strict=True))
    for strategy in ("random", "prs"):  # responses + feedback, exactly
        part = samples.filter(pl.col("strategy") == strategy)
        total = part["n_tokens"].sum() + part["extra_tokens"].sum()
        assert tokens[strategy] == pytest.approx(total / n)
    assert (run / "figures/prs_compare.png").exists()


@slow
def test_noop_rerun_and_single_target(run):
    workdir = run.parent.parent
    dry = snakemake(workdir, "-n")
    assert "Nothing to be done" in dry.stdout + dry.stderr
    target = run / "cdf/train.parquet"
    before = pq.read_table(target)
    target.unlink()
    proc = snakemake(workdir, str(target.relative_to(workdir)))
    out = proc.stdout + proc.stderr
    assert "rule cdf:" in out or "localrule cdf:" in out
    for other in ("sft", "sample", "score", "reward_model"):
        assert f"rule {other}:" not in out
    assert pq.read_table(target).equals(before)


@pytest.mark.parametrize(
    "section, values, message",
    [
        ("cdf", {"objective": "median"}, "median"),
        ("sampling", {"M": {"train": 1, "test": 8}}, "minimum"),
        ("prompts", {"min_words": 5, "max_words": 3}, "prompts.max_words"),
    ],
)
def test_bad_config_fails_at_validation(tmp_path, section, values, message):
    config = cfg()
    config[section].update(values)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    proc = snakemake(tmp_path, "-n", configfile=bad, check=False)
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists()


def test_schema_names_cover_tables():
    assert set(TABLES.values()) <= set(SCHEMAS)


# ---------------------------------------------------------------------------------------------
# The plan, in dry runs (nothing runs; seconds)


def dry_run(workdir: Path, *args: str, configfile: Path = TINY) -> str:
    proc = snakemake(workdir, "-n", *args, configfile=configfile)
    return proc.stdout + proc.stderr


def planned_jobs(output: str) -> list[dict[str, str]]:
    """The jobs a dry run lists: rule and its printed fields (input, output, benchmark, reason,
    wildcards, ...)."""
    jobs = []
    for m in re.finditer(r"^(localrule|rule) (\w+):\n((?:    .*\n?)*)", output, re.M):
        fields = dict(re.findall(r"^    (\w+): (.*)$", m[3], re.M))
        jobs.append({"rule": m[2], "local": m[1] == "localrule", **fields})
    return jobs


def inputs_of(job: dict[str, str]) -> set[str]:
    return set(job["input"].split(", ")) if "input" in job else set()


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def test_tiny_cpu_rules_are_local_and_gpu_rules_benchmarked(tmp_path):
    """Under a cluster profile the local rules run on the submitting host; every job of a GPU
    rule writes a benchmark table under results/<task>/benchmarks/, no other job does."""
    jobs = [j for j in planned_jobs(dry_run(tmp_path)) if j["rule"] != "all"]
    assert {j["rule"] for j in jobs} == LOCAL_RULES | GPU_RULES
    # a dry run does not say which jobs are local (a SLURM run does: test_slurm.py)
    block = re.search(r"^localrules:\n((?:    \w+,?\n)+)", (ROOT / "Snakefile").read_text(), re.M)
    assert set(re.findall(r"\w+", block[1])) == LOCAL_RULES | {"chatterbot_dataset", "import_cache"}  # not in tiny
    for job in jobs:
        if job["rule"] in GPU_RULES:
            assert re.fullmatch(r"results/tiny/benchmarks/[\w.-]+\.tsv", job["benchmark"]), job
        else:
            assert "benchmark" not in job, job
    benchmarks = [j["benchmark"] for j in jobs if "benchmark" in j]
    assert len(set(benchmarks)) == len(benchmarks)
    prompts = next(j for j in jobs if j["rule"] == "prompts")
    assert not inputs_of(prompts)  # the built-in corpus ships in a wheel: no file to watch


def test_local_files_a_rule_reads_are_its_inputs(tmp_path):
    """A local corpus (prompts), base model (sft) and gold classifier (every rule that scores
    with gold) are inputs, file by file, so that editing one reruns its readers; hidden files
    (a download cache) are not."""
    corpus = tmp_path / "corpus.csv"
    corpus.write_text("text,movie\n")
    base, gold = tmp_path / "base", tmp_path / "gold"
    for d in (base, gold):
        (d / ".cache").mkdir(parents=True)
        (d / ".cache" / "download.lock").write_text("")
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            (d / name).write_text("{}")  # a dry run reads none of them
    config = yaml.safe_load(TINY.read_text())
    config["corpus"] = {"path": str(corpus), "text_column": "text", "group_column": "movie"}
    config["policy"]["base"] = str(base)
    config["gold"] = {"type": "hf", "model": str(gold)}
    workdir = tmp_path / "work"
    workdir.mkdir()
    jobs = planned_jobs(dry_run(workdir, configfile=write_config(tmp_path / "c.yaml", config)))
    base_files = {str(base / n) for n in ("config.json", "model.safetensors", "tokenizer.json")}
    gold_files = {str(gold / n) for n in ("config.json", "model.safetensors", "tokenizer.json")}
    gold_readers = {"preferences", "score", "evaluate", "prs_compare"}  # prs_compare: gold_response
    for job in jobs:
        inputs = inputs_of(job)
        assert (str(corpus) in inputs) == (job["rule"] == "prompts"), job
        assert (base_files <= inputs) == (job["rule"] == "sft"), job
        assert (gold_files <= inputs) == (job["rule"] in gold_readers), job
        assert not any(".cache" in i for i in inputs), job
    assert sum(j["rule"] == "evaluate" for j in jobs) == 9


def test_run_names_are_matched_literally(tmp_path):
    """Wildcard constraints built from run names escape them: `ppo-b0.05` does not match
    `ppo-b0x05`."""
    dry_run(tmp_path, "results/tiny/logs/train-ppo-b0.05.parquet",
            "results/tiny/eval/summary-ppo-b0.05.parquet")
    for target in ("results/tiny/logs/train-ppo-b0x05.parquet",
                   "results/tiny/eval/summary-ppo-b0x05.parquet"):
        proc = snakemake(tmp_path, "-n", target, check=False)
        assert proc.returncode != 0
        assert "MissingRuleException" in proc.stdout + proc.stderr, target


@slow
def test_a_setting_reruns_only_the_jobs_that_read_it(run, tmp_path):
    """Each rule's params name the settings it reads: a setting no job reads (device), or one
    only some jobs read, reruns only those (dry runs against the finished DAG's metadata)."""
    workdir = run.parent.parent

    def params_changed(change, *args: str) -> set[str]:
        config = yaml.safe_load(TINY.read_text())
        change(config)
        out = dry_run(workdir, *args, configfile=write_config(tmp_path / "changed.yaml", config))
        return {f"{j['rule']}[{j.get('wildcards', '')}]" for j in planned_jobs(out)
                if "Params have changed" in j.get("reason", "")}

    assert params_changed(lambda c: None) == set()
    assert params_changed(lambda c: c.update(device="auto")) == set()
    # `prs` only guides PRS sampling (tiny.yaml samples at random) and the PRS comparison
    assert params_changed(lambda c: c["prs"].update(feedback_max_new_tokens=9)) == {
        "prs_compare[]"}
    # the BoN-curve grid is bon_curve's (and the frontier's KL grid), not the policies'
    # evaluation
    assert params_changed(lambda c: c["evaluation"].update(bon_ns=[1, 2, 4])) == {
        "bon_curve[]", "frontier[]"}
    # a run reads its own trainer's section: the PPO trainer's, or the preference trainer's
    ppo_runs = {"ppo-b0.05", "vbon-n4-exact", "vbon-n4-l1", "bond-n4-w0.5"}
    assert params_changed(lambda c: c["training"]["ppo"].update(steps=5)) == {
        f"train[policy={r}]" for r in ppo_runs}
    assert params_changed(lambda c: c["training"]["preference"].update(epochs=3)) == {
        f"train[policy={r}]" for r in set(RUNS) - ppo_runs}
    # the chat-template setting is applied whenever a policy tokenizer is loaded: sft reads it
    # (and everything downstream reruns from there); with sft kept as it is, the jobs that
    # load the SFT policy report it themselves (the PPO-family runs then follow their
    # rerun reward models instead)
    chat_off = lambda c: c["policy"].update(chat_template=False)  # noqa: E731
    assert params_changed(chat_off) == {"sft[]"}
    kept_sft = ("--allowed-rules", "reward_model", "train", "prs_compare", "all")
    assert params_changed(chat_off, *kept_sft) == {
        "reward_model[seed=1]", "reward_model[seed=2]", "prs_compare[]",
        *(f"train[policy={r}]" for r in set(RUNS) - ppo_runs)}


@slow
def test_gpu_jobs_write_benchmarks_readable_with_polars(run):
    """Snakemake's benchmark tables (tab-separated: s, h:m:s, max_rss, ..., cpu_time), one per
    GPU job, read with polars as the README shows."""
    expected = {"sft", "preferences", "rm-seed1", "rm-seed2", "score-train", "score-test",
                "prs_compare", *(f"sample-{s}-{i}" for s in ("train", "test") for i in (0, 1)),
                *(f"train-{r}" for r in RUNS), *(f"evaluate-{p}" for p in ("sft", *RUNS))}
    assert {p.stem for p in (run / "benchmarks").glob("*.tsv")} == expected
    for name in expected:
        bench = pl.read_csv(run / "benchmarks" / f"{name}.tsv", separator="\t")
        assert bench.height == 1, name
        assert {"s", "max_rss", "cpu_time"} <= set(bench.columns), name
        assert bench["s"][0] > 0, name


@slow
def test_training_jobs_under_accelerate_launch_ddp(run, tmp_path):
    """training.launch = ddp with 2 processes (on CPU: gloo): `train`, `reward_model` and `sft`
    jobs run through `accelerate launch`; DPO, whose global batches are split over the ranks,
    reproduces the one-process run; PPO, the reward model and SFT train and record how."""
    from safetensors.torch import load_file

    config = cfg()
    config["training"]["launch"] = {"accelerate_config": "ddp", "num_processes": 2}
    config["training"]["ppo"]["minibatch_size"] = 2  # a multiple of the 2 processes
    configfile = tmp_path / "tiny-ddp.yaml"
    configfile.write_text(yaml.safe_dump(config))
    workdir = tmp_path / "ddp"
    shutil.copytree(run.parent.parent / "results", workdir / "results")  # keeps mtimes
    targets = [f"results/tiny/logs/train-{r}.parquet" for r in ("dpo-n4-b0.1", "ppo-b0.05")]
    proc = snakemake(workdir, *targets, "--forcerun", "train", configfile=configfile)
    out = proc.stdout + proc.stderr
    assert "rule sft:" not in out and "rule sample:" not in out  # only the two train jobs
    res = workdir / "results/tiny"
    for r in ("dpo-n4-b0.1", "ppo-b0.05"):
        log_text = (res / f"logs/train-{r}.log").read_text()
        assert "launching 2 process(es)" in log_text and "config/accelerate/ddp.yaml" in log_text
        prov = read_provenance(res / f"logs/train-{r}.parquet")
        assert prov["processes"] == 2 and prov["accelerate_config"] == "ddp"
        assert not (res / f"checkpoints/{r}").exists()
    one = read_polars(run / "logs/train-dpo-n4-b0.1.parquet", "policy_log")
    two = read_polars(res / "logs/train-dpo-n4-b0.1.parquet", "policy_log")
    assert one["step"].to_list() == two["step"].to_list()
    for col in ("loss", "reward_margin", "accuracy", "lr"):
        assert two[col].to_numpy() == pytest.approx(one[col].to_numpy(), rel=1e-4, abs=1e-5), col
    wa = load_file(str(run / "policies/dpo-n4-b0.1/model.safetensors"))
    wb = load_file(str(res / "policies/dpo-n4-b0.1/model.safetensors"))
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4
    ppo = read_polars(res / "logs/train-ppo-b0.05.parquet", "policy_log")
    assert ppo["step"].to_list() == [1, 2, 3, 4] and ppo["loss"].is_finite().all()
    # The other training jobs, one at a time (a target alone reruns nothing downstream).
    # Their models use dropout, whose masks differ with the process count, so these runs are
    # compared loosely; exact equality is test_launch.py's, without dropout.
    for target, rule in (("logs/rm-seed1.parquet", "reward_model"), ("logs/sft.parquet", "sft")):
        proc = snakemake(workdir, f"results/tiny/{target}", "--forcerun", rule,
                         configfile=configfile)
        out = proc.stdout + proc.stderr
        assert f"rule {rule}:" in out and "rule train:" not in out
        assert read_provenance(res / target)["processes"] == 2
        log_text = (res / target).with_suffix(".log").read_text()
        assert "launching 2 process(es)" in log_text
        table = read_polars(res / target, "train_log")
        one_table = read_polars(run / target, "train_log")
        assert table["step"].to_list() == one_table["step"].to_list()
        # same data, initialisation and data order; only the dropout masks differ
        last, one_last = (t.filter(pl.col("split") == "train")["loss"][-1]
                          for t in (table, one_table))
        assert last == pytest.approx(one_last, rel=0.05), target


@slow
def test_killed_sft_job_resumes_from_its_checkpoint_with_rerun_incomplete(tmp_path):
    """Snakemake killed (SIGKILL, as a lost node or a wall-time kill) during the SFT job; the
    rerun with --rerun-incomplete resumes at the checkpoint and trains the same model as an
    uninterrupted run."""
    from safetensors.torch import load_file

    config = cfg()
    config["sft"].update(max_steps=200, checkpoint_every=20, log_every=20)
    configfile = tmp_path / "tiny-long-sft.yaml"
    configfile.write_text(yaml.safe_dump(config))
    target = "results/tiny/models/sft"
    whole = tmp_path / "whole"
    whole.mkdir()
    snakemake(whole, target, configfile=configfile)

    killed = tmp_path / "killed"
    killed.mkdir()
    cmd = snakemake_cmd(killed, "--cores", "2", target, configfile=configfile)
    proc = subprocess.Popen(cmd, cwd=killed, env=snakemake_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    state = killed / "results/tiny/checkpoints/sft/last/state.json"
    deadline = time.monotonic() + 600
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert state.exists() and not (killed / target).exists(), "not killed mid-training"

    snakemake(killed, target, "--unlock", configfile=configfile)  # a killed run keeps its lock
    out = snakemake(killed, target, "--rerun-incomplete", configfile=configfile)
    log = (killed / "results/tiny/logs/sft.log").read_text()
    assert "resuming sft from" in log, out.stdout + out.stderr
    assert not (killed / "results/tiny/checkpoints/sft").exists()
    a = load_file(str(whole / target / "model.safetensors"))
    b = load_file(str(killed / target / "model.safetensors"))
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    rows_a = read_polars(whole / "results/tiny/logs/sft.parquet", "train_log")
    rows_b = read_polars(killed / "results/tiny/logs/sft.parquet", "train_log")
    assert rows_a["step"].to_list() == rows_b["step"].to_list()
    assert rows_b["loss"].to_list() == pytest.approx(rows_a["loss"].to_list(), abs=1e-6)
