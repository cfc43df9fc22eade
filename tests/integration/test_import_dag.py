"""An imported reference cache through Snakemake: the plan (no sampling, scoring, SFT or reward
model job), the config check before any job, and a run up to the CDFs and BoN curves."""

from __future__ import annotations

import itertools
import json
import subprocess
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from dag_support import job_counts, snakemake_cmd, snakemake_env

from pipeline_lib.io.tables import read_polars, read_provenance

pytestmark = pytest.mark.integration


def write_cache(tmp_path: Path) -> dict[str, str]:
    """vbon_samples files of both splits: 3 prompts x 5 samples (ties included)."""
    files = {}
    for split in ("train", "test"):
        rows = [{"prompt": f"{split} prompt {i}", "text": f"{split} prompt {i} answer {j}",
                 "reward": float((i * 7 + j * 3) % 4)} for i in range(3) for j in range(5)]
        path = tmp_path / f"imdb-{split}-bon-vllm.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        files[split] = str(path)
    return files


def import_config(tmp_path: Path, **changes) -> Path:
    cfg = {"task": "imported", "seed": 0, "device": "cpu", "methods": [],
           "sampling": {"M": {"train": 4, "test": 4}},
           "cdf": {"normalize": True},
           "evaluation": {"bon_ns": [1, 2, 4]},
           "reference_cache": {"source": "import", "format": "vbon_samples",
                               "files": write_cache(tmp_path), "gold": "reward",
                               "proxies": {"distilbert": "reward"}},
           **changes}
    path = tmp_path / "import.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def snakemake(workdir: Path, configfile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(snakemake_cmd(workdir, "--cores", "1", *args, configfile=configfile),
                          cwd=workdir, capture_output=True, text=True, env=snakemake_env())


def test_import_plan_has_no_sampling_scoring_or_training_job(tmp_path):
    proc = snakemake(tmp_path, import_config(tmp_path), "-n")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert job_counts(proc.stdout) == {"import_cache": 2, "cdf": 2, "bon_curve": 1,
                                       "summary": 1, "all": 1}


def test_import_with_a_dpo_run_fails_before_any_job(tmp_path):
    cfg = import_config(tmp_path, methods=[{"method": "dpo", "n": 4, "beta": 0.1}])
    proc = snakemake(tmp_path, cfg, "-n")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "invalid configuration" in out
    assert "run 'dpo-n4-b0.1' (method dpo)" in out and "samples column ref_logprob" in out
    assert "import_cache" not in out  # no job ran


@pytest.mark.slow  # ~30 s on 2 cores
def test_import_runs_to_cdf_bon_curve_and_summary(tmp_path):
    proc = snakemake(tmp_path, import_config(tmp_path))
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    out = tmp_path / "results" / "imported"
    samples = read_polars(out / "samples/train.parquet", "samples")
    assert samples.height == 3 * 4 and samples["ref_logprob"].null_count() == 12
    assert read_provenance(out / "rewards/test.parquet")["source"].endswith(
        "imdb-test-bon-vllm.jsonl")
    assert read_polars(out / "cdf/test.parquet", "cdf").height == 3
    bon = read_polars(out / "eval/bon.parquet", "bon_curve")
    assert set(bon["n"]) == {1, 2, 4} and set(bon["pool_size"]) == {4}
    # the summary of an imported cache: no policy, the configured objective's BoN points
    # (cdf.objective uwo, lambda 0.5, of the one proxy), their values those of the BoN table
    summary = read_polars(out / "summary.parquet", "eval_summary")
    uwo = bon.filter(pl.col("objective") == "uwo").sort("n")
    assert summary["policy"].to_list() == ["bon-n1", "bon-n2", "bon-n4"]
    assert set(summary["method"]) == {"bon"}
    for col, bon_col in (("n", "n"), ("gold", "gold"), ("proxy", "proxy"), ("kl", "kl_analytic"),
                         ("win_rate_ref", "win_rate_ref"), ("win_rate_judges", "win_rate_judges")):
        assert summary[col].to_list() == uwo[bon_col].to_list(), col
    # M = 4: one held-out judge (M // 4), best-of-n from the other 3 (none for n = 4)
    assert summary["win_rate_judges"].to_list() == [1, 1, 1]
    assert summary["win_rate_ref"][2] is None
    # recomputed by hand: proxy = gold (both the `reward` column), so best of an n-subset of
    # samples 1..3 has the subset's max reward; against sample 0, ties 1/2
    test = read_polars(out / "rewards/test.parquet", "rewards").filter(pl.col("kind") == "gold")
    gold = np.array(test.sort("prompt_id", "sample_idx")["reward"].to_list()).reshape(3, 4)
    for n, got in zip((1, 2), summary["win_rate_ref"][:2], strict=True):
        want = np.mean([np.mean([(max(g[list(c)]) > g[0]) + 0.5 * (max(g[list(c)]) == g[0])
                                 for c in itertools.combinations(range(1, 4), n)])
                        for g in gold])
        assert got == pytest.approx(want, abs=1e-12), n
    assert summary["win_rate_n"].to_list() == [4, 4, 4]  # evaluation.win_rate_n 8, capped at M
    assert not (out / "eval" / "summary-sft.parquet").exists()
    assert pl.read_csv(out / "summary.csv").height == 3
    for fig in ("bon_curves", "kl_gold", "win_rates", "kl_win_rate"):
        assert (out / f"figures/{fig}.png").stat().st_size > 10_000
