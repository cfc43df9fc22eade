"""Stage frontier: a sweep's per-prompt values from its evaluation samples, BoN's from the test
cache, read off on the BoN KL grid with bootstrap intervals (pipeline_lib.stages.frontier)."""

from __future__ import annotations

import copy

import numpy as np
import polars as pl
import pytest

from pipeline_lib.io.tables import read_polars, write_table
from pipeline_lib.math.bon import bon_kl
from pipeline_lib.settings.config import validate_config
from pipeline_lib.settings.sections import Settings
from pipeline_lib.stages.bon_curve import run_bon_curve
from pipeline_lib.stages.common import StageError
from pipeline_lib.stages.frontier import frontier_table, run_frontier, sweep_points

P, M, K, J = 12, 16, 4, 4
BETAS = (0.01, 0.1, 1.0)
SEEDS = (0, 1)


def _cache(gold: np.ndarray, proxy: np.ndarray) -> pl.DataFrame:
    p, m = gold.shape
    ids = [f"test-{i:05d}" for i in range(p) for _ in range(m)]
    idx = [j for _ in range(p) for j in range(m)]
    return pl.concat([
        pl.DataFrame({"prompt_id": ids, "sample_idx": idx, "scorer": name, "kind": kind,
                      "reward": values.ravel().astype(float)})
        for name, kind, values in (("gold", "gold", gold), ("rm-seed1", "proxy", proxy))
    ]).with_columns(pl.col("sample_idx").cast(pl.Int32))


def _eval_samples(name: str, kl: np.ndarray, gold: np.ndarray) -> pl.DataFrame:
    """(P, K) per-sample k1 terms and gold of one policy as an eval_samples table."""
    p, k = gold.shape
    return pl.DataFrame({
        "policy": name, "prompt_id": [f"test-{i:05d}" for i in range(p) for _ in range(k)],
        "sample_idx": [j for _ in range(p) for j in range(k)], "response": "r",
        "n_tokens": 3, "gold": gold.ravel(), "proxy": gold.ravel(),
        "logp_policy": kl.ravel() - 5.0, "logp_ref": np.full(p * k, -5.0), "k3_sum": 0.0,
    }).with_columns(pl.col("sample_idx", "n_tokens").cast(pl.Int32))


@pytest.fixture()
def sweep(tmp_path, config):
    """A ppo sweep over 3 betas x 2 seeds whose KL falls and gold rises with 1/beta, on a
    16-sample test cache (4 held-out judges); returns (settings, evals, cache path, arrays)."""
    cfg = copy.deepcopy(config)
    cfg["methods"] = [{"method": "ppo", "beta": list(BETAS), "seeds": list(SEEDS)}]
    cfg["sampling"]["M"]["test"] = M
    cfg["cdf"]["normalize"] = False
    cfg["evaluation"].update(win_rate_judges=J, bon_ns=[1, 2, 4, 8, 16])
    s = Settings.from_config(validate_config(cfg))
    rng = np.random.default_rng(0)
    prompt_effect = rng.normal(0, 0.5, size=(P, 1))
    gold = rng.normal(size=(P, M)) + prompt_effect
    proxy = gold + rng.normal(0, 0.3, size=(P, M))
    write_table(_cache(gold, proxy), tmp_path / "rewards.parquet", "rewards", {})
    evals, kls, golds = {}, {}, {}
    for r, beta in enumerate(BETAS):
        for seed in SEEDS:
            name = next(n for n, run in s.methods.items() if run.beta == beta and run.seed == seed)
            kl = np.abs(rng.normal(0.05 / beta + 0.1 * seed, 0.05, size=(P, K)))
            g = rng.normal(0.3 * r + 0.05 * seed, 1.0, size=(P, K)) + prompt_effect
            evals[name] = tmp_path / f"policy-{name}.parquet"
            write_table(_eval_samples(name, kl, g), evals[name], "eval_samples", {})
            kls[name], golds[name] = kl, g
    return s, evals, tmp_path / "rewards.parquet", (gold, proxy, kls, golds)


def test_sweep_points_group_seeds_in_knob_order(sweep):
    s, *_ = sweep
    points = sweep_points(s.methods)
    assert list(points) == [next(iter(s.methods.values())).sweep]
    (only,) = points.values()
    assert [[s.methods[n].beta for n in seeds] for seeds in only] == [[b, b] for b in BETAS]
    assert [[s.methods[n].seed for n in seeds] for seeds in only] == [list(SEEDS)] * 3


def test_frontier_estimates_are_the_interpolated_sweep_and_bon_of_the_same_cache(sweep,
                                                                                tmp_path):
    s, evals, rewards, (gold, proxy, kls, golds) = sweep
    table = frontier_table(s, evals, rewards, None)
    run_bon_curve(s.source, rewards, None, tmp_path / "bon.parquet")
    bon = read_polars(tmp_path / "bon.parquet", "bon_curve").filter(
        pl.col("objective") == "mean").sort("n")
    ns = [1, 2, 4, 8]  # n <= M - J
    assert table["bon_n"].unique().sort().to_list() == ns
    assert np.allclose(table.filter(pl.col("metric") == "gold")["kl"], bon_kl(np.array(ns)))
    # BoN's full-data values are the bon_curve stage's (gold over all M, win rate vs judges)
    for metric, col in (("gold", "gold"), ("win_rate", "win_rate_ref")):
        got = table.filter(pl.col("metric") == metric).sort("bon_n")["bon_estimate"].to_numpy()
        want = bon.filter(pl.col("n").is_in(ns))[col].to_numpy()
        assert np.allclose(got, want, atol=1e-12)
    # the method's estimate: runs' means over seeds and prompts, interpolated in KL
    points = next(iter(sweep_points(s.methods).values()))
    run_kl = np.array([np.mean([kls[n].mean() for n in seeds]) for seeds in points])
    run_gold = np.array([np.mean([golds[n].mean() for n in seeds]) for seeds in points])
    grid = bon_kl(np.array(ns, dtype=float))
    order = np.argsort(run_kl)
    inside = (grid >= run_kl.min()) & (grid <= run_kl.max())
    assert inside.any() and not inside.all()
    want = np.where(inside, np.interp(grid, run_kl[order], run_gold[order]), np.nan)
    rows = table.filter(pl.col("metric") == "gold").sort("bon_n")
    got = rows["method_estimate"].to_numpy().astype(float)
    assert np.allclose(got, want, equal_nan=True)
    assert rows["covered"].to_list() == inside.tolist()
    gap = rows["gap_estimate"].to_numpy().astype(float)
    assert np.allclose(gap, want - rows["bon_estimate"].to_numpy(), equal_nan=True)
    covered = rows.filter(pl.col("covered"))
    assert (covered["method_low"] <= covered["method_estimate"]).all()
    assert (covered["method_estimate"] <= covered["method_high"]).all()
    assert (covered["method_se"] > 0).all()
    assert set(table["n_seeds"]) == {2} and set(table["n_points"]) == {3}
    assert set(table["kl_estimator"]) == {"k1"} and set(table["bon_kl_estimator"]) == {
        "analytic_bon"}


def test_frontier_is_deterministic_and_written_with_its_schema(sweep, tmp_path):
    s, evals, rewards, _ = sweep
    for out in ("a.parquet", "b.parquet"):
        run_frontier(s, evals, rewards, None, tmp_path / out)
    a = read_polars(tmp_path / "a.parquet", "frontier")
    assert a.equals(read_polars(tmp_path / "b.parquet", "frontier"))


def test_a_sweep_with_uneven_seeds_is_refused(sweep):
    s, *_ = sweep
    runs = dict(s.methods)
    runs.pop(next(iter(runs)))
    with pytest.raises(StageError, match="different numbers of training seeds"):
        sweep_points(runs)
