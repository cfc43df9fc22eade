"""The cache-scale benchmark runs the real stages on its synthetic cache (tiny sizes here)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import polars as pl
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    """The script as a module by name: its stages run in spawned processes, which import it."""
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    return importlib.import_module("bench_cache_scale")


@pytest.mark.slow
def test_the_benchmark_runs_every_stage_on_a_valid_synthetic_cache(tmp_path, capsys):
    bench = _bench()
    assert bench.main(["--prompts", "12", "--samples", "20", "--train-samples", "9",
                       "--shards", "2", "--tokens", "4", "--pairs-n", "2", "8",
                       "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r.split(" | ")[0] for r in rows[1:]] == [
        "| gather", "| score", "| cdf", "| pairs n=2", "| pairs n=8", "| bon_curve"]
    assert all(r.endswith("| ok |") for r in rows[1:]), out
    assert "12 prompts x 20 samples x 6 scorers = 1,440 rewards" in out
    # the stages' own outputs: the whole cache, gathered in prompt order; every n of the grid
    gathered = pl.read_parquet(tmp_path / "gather.parquet")
    assert gathered.height == 12 * 20
    assert gathered["prompt_id"].unique(maintain_order=True).to_list() == \
        [f"p{i:06d}" for i in range(12)]
    bon = pl.read_parquet(tmp_path / "bon_curve.parquet")
    assert sorted(set(bon["n"])) == [1, 2, 4, 8, 16, 20]
    assert {"mean", "wco", "rm-seed5"} <= set(bon["objective"])
    assert pl.read_parquet(tmp_path / "score.parquet").height == 12 * 20 * 6
    assert pl.read_parquet(tmp_path / "cdf.parquet").height >= 12
    assert pl.read_parquet(tmp_path / "pairs.parquet").height == 12
