"""The real Snakemake DAG on the tiny config: tables, no-op rerun, single targets, determinism.

Runs `snakemake` as users do (a subprocess), in temporary working directories.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline_lib.cdf import empirical_cdf
from pipeline_lib.schemas import SCHEMAS, read_polars, read_provenance

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "data" / "tiny.yaml"
pytestmark = pytest.mark.integration

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
    "data/prs-instructions.parquet": "prompts",
    "prs/samples.parquet": "prs_samples",
    "prs/compare.parquet": "prs_compare",
}
RUNS = ["ppo-b0.05", "vbon-n4-exact", "vbon-n4-l1", "bond-n4-w0.5", "dpo-n4-b0.1", "ipo-n4-b0.1",
        "bonbon-n4", "bon_sft-n4"]
TABLES |= {f"logs/train-{r}.parquet": "policy_log" for r in RUNS}


def snakemake(workdir: Path, *args: str, configfile: Path = TINY, check: bool = True):
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"),
           "--directory", str(workdir), "--configfile", str(configfile), "--cores", "2", *args]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("dag")
    snakemake(workdir)
    return workdir / "results" / "tiny"


def cfg() -> dict:
    return yaml.safe_load(TINY.read_text())


def test_every_table_matches_its_schema(run):
    for rel, schema in TABLES.items():
        frame = read_polars(run / rel, schema)
        assert frame.height > 0, rel
        assert read_provenance(run / rel)["config_hash"], rel
    for d in ("models/sft", "models/rm-seed1", "models/rm-seed2"):
        assert (run / d / "model.safetensors").exists()
        assert (run / d / "config.json").exists()


def test_prompt_splits_are_disjoint_by_group(run):
    train = read_polars(run / "data/prompts-train.parquet", "prompts")
    test = read_polars(run / "data/prompts-test.parquet", "prompts")
    pref = read_polars(run / "data/prompts-pref.parquet", "prompts")
    c = cfg()["prompts"]
    assert (train.height, test.height, pref.height) == (c["n_train"], c["n_test"], c["n_pref"])
    assert set(train["group"]).isdisjoint(set(test["group"]))
    assert set(pref["text_id"]).isdisjoint(set(train["text_id"]))
    assert train["n_words"].min() >= 2 and train["n_words"].max() <= 8


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


def test_pairs_are_best_and_worst_of_first_n(run):
    pairs = read_polars(run / "data/bon4-pairs.parquet", "pairs")
    assert (pairs["best_idx"] < 4).all() and (pairs["worst_idx"] < 4).all()
    assert (pairs["best_proxy"] > pairs["worst_proxy"]).all()


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
    n1 = bon.filter(pl.col("n") == 1)
    assert n1["win_rate_ref"].to_list() == pytest.approx([0.5] * n1.height)
    assert (bon["kl_ties"] <= bon["kl_analytic"] + 1e-12).all()
    samples = read_polars(run / "eval/policy-sft.parquet", "eval_samples")
    assert samples.height == cfg()["prompts"]["n_test"] * 8
    for fig in ("bon_curves", "kl_gold", "win_rates"):
        assert (run / f"figures/{fig}.png").stat().st_size > 10_000


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


def test_same_config_and_seed_give_identical_tables(run, tmp_path):
    """A second run (with a different shard count, which must not matter) reproduces every
    table exactly."""
    config = cfg()
    config["sampling"]["shards"] = 1
    configfile = tmp_path / "tiny-1shard.yaml"
    configfile.write_text(yaml.safe_dump(config))
    workdir = tmp_path / "again"
    workdir.mkdir()
    snakemake(workdir, configfile=configfile)
    for rel in TABLES:
        a = pq.read_table(run / rel).replace_schema_metadata(None)
        b = pq.read_table(workdir / "results/tiny" / rel).replace_schema_metadata(None)
        if "elapsed_s" in a.column_names:  # wall-clock column differs; nothing else may
            a, b = a.drop(["elapsed_s"]), b.drop(["elapsed_s"])
        assert a.equals(b), f"{rel} differs between two runs of the same config and seed"
    shutil.rmtree(workdir)


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
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"),
           "--directory", str(killed), "--configfile", str(configfile), "--cores", "2", target]
    proc = subprocess.Popen(cmd, cwd=killed, env={**os.environ, "PYTHONHASHSEED": "0"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
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
