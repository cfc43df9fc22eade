"""Held-out judges of the win rates (evaluation.win_rate_judges): the BoN points of bon_curve
select from the non-judge samples and are judged like the policies, exactly n/(n+1) in
expectation; the summary with and without policy evaluations (an imported cache)."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import polars as pl
import pytest

from pipeline_lib.io.tables import read_polars, write_table
from pipeline_lib.math.winrate import bon_win_rate, bon_win_rates, win_rate, win_rates_vs_bon
from pipeline_lib.settings.config import check_config, validate_config
from pipeline_lib.settings.errors import ConfigError
from pipeline_lib.settings.sections import Settings
from pipeline_lib.stages.bon_curve import run_bon_curve
from pipeline_lib.stages.budget import BUDGET_COLUMNS, BUDGET_TYPES
from pipeline_lib.stages.common import StageError
from pipeline_lib.stages.evaluate import policy_win_rates
from pipeline_lib.stages.generate import sampling_columns
from pipeline_lib.stages.reward_cache import configured_objective_name
from pipeline_lib.stages.summary import run_summary, summary_table


def _cache(gold: np.ndarray, proxy: np.ndarray) -> pl.DataFrame:
    """A long reward cache: gold and one proxy member (rm-seed1), (P, M) each."""
    p, m = gold.shape
    ids = [f"test-{i:05d}" for i in range(p) for _ in range(m)]
    idx = [j for _ in range(p) for j in range(m)]
    frames = [pl.DataFrame({"prompt_id": ids, "sample_idx": idx, "scorer": name, "kind": kind,
                            "reward": values.ravel().astype(float)})
              for name, kind, values in (("gold", "gold", gold), ("rm-seed1", "proxy", proxy))]
    return pl.concat(frames).with_columns(pl.col("sample_idx").cast(pl.Int32))


def _config(config: dict, m: int, judges: int | None, bon_ns: list[int]) -> dict:
    cfg = copy.deepcopy(config)
    cfg["sampling"]["M"]["test"] = m
    cfg["cdf"]["normalize"] = False
    cfg["evaluation"].update(win_rate_judges=judges, bon_ns=bon_ns)
    return cfg


def _bon(tmp_path, cfg: dict, gold: np.ndarray, proxy: np.ndarray) -> pl.DataFrame:
    write_table(_cache(gold, proxy), tmp_path / "rewards.parquet", "rewards", {})
    run_bon_curve(cfg, tmp_path / "rewards.parquet", None, tmp_path / "bon.parquet")
    return read_polars(tmp_path / "bon.parquet", "bon_curve")


def _brute(proxy: np.ndarray, gold: np.ndarray, judges: np.ndarray, n: int) -> float:
    """Every n-subset of the pool, the proxy-tied best sharing the pick, against every judge
    (ties 1/2); mean over subsets, judges, prompts."""
    out = []
    for p in range(proxy.shape[0]):
        vals = []
        for subset in itertools.combinations(range(proxy.shape[1]), n):
            top = max(proxy[p, j] for j in subset)
            sel = [j for j in subset if proxy[p, j] == top]
            vals.append(np.mean([np.mean((gold[p, j] > judges[p]) + 0.5 * (gold[p, j] == judges[p]))
                                 for j in sel]))
        out.append(np.mean(vals))
    return float(np.mean(out))


def test_bon_points_win_rate_is_exactly_n_over_n_plus_1_against_held_out_judges(tmp_path,
                                                                               config):
    """Judges (samples 0..4) at every rank around a pool of 4 continuous values (samples
    5..8), proxy = gold: each BoN point's win_rate_ref is the expectation over an independent
    judge, n/(n+1) exactly; its complement (a dropped `1 -`) or a pool judged by itself
    would not be. n above the 4 non-judge samples has no win rate."""
    p, m, judges = 3, 9, 5
    rng = np.random.default_rng(0)
    pool = np.stack([rng.permutation(4) + 1.0 for _ in range(p)])
    gold = np.concatenate([np.tile(np.arange(judges) + 0.5, (p, 1)), pool], axis=1)
    cfg = _config(config, m, judges, [1, 2, 3, 4, 8])
    bon = _bon(tmp_path, cfg, gold, gold)
    assert set(bon["win_rate_judges"]) == {judges} and set(bon["pool_size"]) == {m}
    for obj in ("rm-seed1", "mean"):
        part = bon.filter(pl.col("objective") == obj).sort("n")
        win = dict(zip(part["n"].to_list(), part["win_rate_ref"].to_list(), strict=True))
        for n in (1, 2, 3, 4):
            assert win[n] == pytest.approx(n / (n + 1), abs=1e-12), (obj, n)
        assert win[8] is None


@pytest.mark.parametrize("seed", [0, 1])
def test_bon_points_win_rate_matches_subset_enumeration_with_ties(tmp_path, config, seed):
    p, m, judges = 3, 8, 3
    rng = np.random.default_rng(seed)
    gold = rng.integers(0, 4, size=(p, m)).astype(float)
    proxy = rng.integers(0, 3, size=(p, m)).astype(float)
    bon = _bon(tmp_path, _config(config, m, judges, [1, 2, 3, 5, 8]), gold, proxy)
    part = bon.filter(pl.col("objective") == "rm-seed1").sort("n")
    for n, got in zip(part["n"], part["win_rate_ref"], strict=True):
        if n > m - judges:
            assert got is None
        else:
            want = _brute(proxy[:, judges:], gold[:, judges:], gold[:, :judges], n)
            assert got == pytest.approx(want, abs=1e-12), n


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_win_rates_at_every_n_at_once_equal_brute_force_and_the_one_n_form(seed):
    """The multi-n form (a BoN curve of each sample's beat fraction) equals subset enumeration
    with ties in proxy and gold, and the one-n function, in the order ns are given."""
    rng = np.random.default_rng(seed)
    p, pool, judges = 4, 7, 3
    proxy = rng.integers(0, 3, size=(p, pool)).astype(float)
    gold = rng.integers(0, 4, size=(p, pool)).astype(float)
    judge = rng.integers(0, 4, size=(p, judges)).astype(float)
    ns = [5, 1, 7, 2, 3]
    got = bon_win_rates(proxy, gold, judge, ns)
    assert got.shape == (5,)
    for n, value in zip(ns, got, strict=True):
        assert value == pytest.approx(_brute(proxy, gold, judge, n), abs=1e-12), n
        assert value == pytest.approx(bon_win_rate(proxy, gold, judge, n), abs=1e-12)
    policy = rng.integers(0, 4, size=(p, 5)).astype(float)
    np.testing.assert_allclose(win_rates_vs_bon(policy, proxy, gold, ns),
                               [1 - _brute(proxy, gold, policy, n) for n in ns], atol=1e-12)
    with pytest.raises(ValueError, match="ns must satisfy"):
        bon_win_rates(proxy, gold, judge, [8])


def test_judges_default_to_a_quarter_of_the_test_cache(tmp_path, config):
    rng = np.random.default_rng(2)
    gold = rng.normal(size=(2, 8))
    bon = _bon(tmp_path, _config(config, 8, None, [1, 2]), gold, gold)
    assert set(bon["win_rate_judges"]) == {2}
    assert Settings.from_config(_config(config, 64, None, [1])).evaluation.judges(64) == 16
    assert Settings.from_config(_config(config, 2, None, [1])).evaluation.judges(2) == 1


def test_judges_must_leave_a_bon_pool(tmp_path, config):
    with pytest.raises(ConfigError, match=r"evaluation.win_rate_judges \(8\) must be below "
                                          r"sampling.M.test \(8\)"):
        check_config(_config(config, 8, 8, [1]))
    check_config(_config(config, 8, 7, [1]))
    bad = _config(config, 8, 0, [1])
    with pytest.raises(Exception, match="minimum"):
        validate_config(bad)
    # a cache smaller than the configured judges (e.g. written under another M) is refused
    gold = np.zeros((2, 4))
    with pytest.raises(StageError, match=r"win_rate_judges \(7\) must be below the cache's M"):
        _bon(tmp_path, _config(config, 8, 7, [1]), gold, gold)


def test_policy_and_bon_points_face_the_same_judges(tmp_path, config):
    """A "policy" whose samples are the non-judge pool itself is the BoN point n = 1: both
    win_rate_ref values are judged by the same held-out samples with the same tie rule."""
    p, m, judges = 4, 10, 3
    rng = np.random.default_rng(3)
    gold = rng.integers(0, 5, size=(p, m)).astype(float)
    proxy = rng.normal(size=(p, m))
    cfg = _config(config, m, judges, [1, 4])
    bon = _bon(tmp_path, cfg, gold, proxy).filter(pl.col("objective") == "rm-seed1")
    rates = policy_win_rates(Settings.from_config(cfg), gold[:, judges:], proxy, gold, "cache")
    assert rates["win_rate_judges"] == judges
    assert rates["win_rate_ref"] == pytest.approx(win_rate(gold[:, judges:], gold[:, :judges]))
    assert rates["win_rate_ref"] == pytest.approx(
        bon.filter(pl.col("n") == 1)["win_rate_ref"][0], abs=1e-14)
    assert rates["win_rate_n"] == 8  # win_rate_bon: best of 8 over all 10 cached samples


def _policy_row(s: Settings, judges: int, **values) -> pl.DataFrame:
    row = {
        "policy": "sft", "method": "sft", "beta": None, "n": None, "gold": 0.1, "gold_se": 0.01,
        "proxy": 0.2, "kl": 0.0, "kl_se": 0.0, "kl_estimator": "k1", "kl_k3": 0.0,
        "win_rate_ref": 0.5, "win_rate_bon": 0.2, "win_rate_n": 8, "win_rate_judges": judges,
        "pareto": False, "sweep": None, "seed": None, **dict.fromkeys(BUDGET_COLUMNS),
        **sampling_columns(s)}
    return pl.DataFrame([{**row, **values}],
                        schema_overrides={"beta": pl.Float64, "n": pl.Int32, "win_rate_n": pl.Int32,
                                          "win_rate_judges": pl.Int32, "top_k": pl.Int32,
                                          "sweep": pl.String, "seed": pl.Int32, **BUDGET_TYPES})


def test_summary_without_policy_evaluations_is_the_bon_points(tmp_path, config):
    """An imported cache evaluates no policy: the summary holds the configured objective's
    BoN points, their values those of the BoN table, and the figures draw them alone."""
    rng = np.random.default_rng(4)
    gold = rng.normal(size=(5, 8))
    proxy = gold + rng.normal(size=(5, 8))
    cfg = _config(config, 8, 2, [1, 2, 4, 8])
    s = Settings.from_config(cfg)
    bon = _bon(tmp_path, cfg, gold, proxy).filter(
        pl.col("objective") == configured_objective_name(s.cdf, s.evaluation.uwo_lambdas))
    table = summary_table(cfg, [], tmp_path / "bon.parquet")
    assert table["policy"].to_list() == ["bon-n1", "bon-n2", "bon-n4", "bon-n8"]
    assert set(table["method"]) == {"bon"}
    for col, bon_col in (("gold", "gold"), ("proxy", "proxy"), ("kl", "kl_analytic"),
                         ("win_rate_ref", "win_rate_ref"), ("win_rate_judges", "win_rate_judges")):
        assert table[col].to_list() == bon[bon_col].to_list(), col
    assert table["win_rate_ref"][3] is None  # n = 8 > the 6 non-judge samples
    assert table["win_rate_n"].to_list() == [8] * 4 and table["pareto"].any()
    figures = {k: tmp_path / f"{k}.png"
               for k in ("bon_curves", "kl_gold", "win_rates", "kl_win_rate")}
    csv = {"summary": tmp_path / "summary.csv", "bon": tmp_path / "bon.csv"}
    run_summary(cfg, [], tmp_path / "bon.parquet", tmp_path / "summary.parquet", figures, csv)
    assert read_polars(tmp_path / "summary.parquet", "eval_summary").equals(table)
    assert all(path.stat().st_size > 10_000 for path in figures.values())
    assert pl.read_csv(csv["summary"]).height == 4


def test_summary_with_a_policy_and_mismatched_judges(tmp_path, config):
    rng = np.random.default_rng(5)
    gold = rng.normal(size=(3, 8))
    cfg = _config(config, 8, 2, [1, 4])
    s = Settings.from_config(cfg)
    _bon(tmp_path, cfg, gold, gold)
    write_table(_policy_row(s, 2), tmp_path / "sft.parquet", "eval_summary", {})
    table = summary_table(cfg, [tmp_path / "sft.parquet"], tmp_path / "bon.parquet")
    assert table["policy"].to_list() == ["sft", "bon-n1", "bon-n4"]
    assert table["win_rate_judges"].to_list() == [2, 2, 2]
    figures = {k: tmp_path / f"{k}.png"
               for k in ("bon_curves", "kl_gold", "win_rates", "kl_win_rate")}
    run_summary(cfg, [tmp_path / "sft.parquet"], tmp_path / "bon.parquet",
                tmp_path / "summary.parquet", figures)
    assert figures["win_rates"].stat().st_size > 10_000
    write_table(_policy_row(s, 3), tmp_path / "sft3.parquet", "eval_summary", {})
    with pytest.raises(StageError, match=r"different numbers of held-out samples: \[2, 3\]"):
        summary_table(cfg, [tmp_path / "sft3.parquet"], tmp_path / "bon.parquet")


def test_the_pareto_flag_respects_standard_errors(tmp_path, config):
    """A policy a hair above BoN's gold at lower KL, within its standard error, does
    not push the BoN point off the frontier (the plain Pareto flag would); one far above does."""
    rng = np.random.default_rng(6)
    gold = rng.normal(size=(6, 8))
    cfg = _config(config, 8, 2, [1, 2, 4])
    s = Settings.from_config(cfg)
    _bon(tmp_path, cfg, gold, gold)
    bon4 = summary_table(cfg, [], tmp_path / "bon.parquet").filter(pl.col("policy") == "bon-n4")
    kl4, gold4 = float(bon4["kl"][0]), float(bon4["gold"][0])
    for lift, bon4_on_front in ((0.01, True), (1.0, False)):
        write_table(_policy_row(s, 2, policy="ppo-b0.1", method="ppo", kl=kl4 - 0.1,
                                kl_se=0.01, gold=gold4 + lift, gold_se=0.05),
                    tmp_path / f"p{lift}.parquet", "eval_summary", {})
        table = summary_table(cfg, [tmp_path / f"p{lift}.parquet"], tmp_path / "bon.parquet")
        assert table.filter(pl.col("policy") == "bon-n4")["pareto"][0] is bon4_on_front
        assert table.filter(pl.col("policy") == "ppo-b0.1")["pareto"][0]


def test_sweep_points_average_seeds_with_their_standard_error(config):
    """Two seeds of two points of one sweep and a lone run: means over seeds, SE = SD/sqrt(2);
    a lone run keeps its own SE."""
    from pipeline_lib.stages.summary import sweep_points_table

    s = Settings.from_config(config)
    rows = [_policy_row(s, 2, policy=f"ppo-b{b}-s{seed}", method="ppo", sweep="ppo", seed=seed,
                        kl=kl, gold=g, win_rate_ref=w)
            for b, seed, kl, g, w in ((0.1, 0, 1.0, 0.5, 0.6), (0.1, 1, 1.2, 0.7, 0.8),
                                      (1, 0, 0.2, 0.1, 0.5), (1, 1, 0.4, 0.3, 0.5))]
    rows.append(_policy_row(s, 2, policy="vbon-n8-exact", method="vbon", sweep="vbon-n8-exact",
                            kl=0.9, gold=0.4, gold_se=0.02))
    points = sweep_points_table(pl.concat(rows))
    ppo = points.filter(pl.col("sweep") == "ppo").sort("kl")
    assert ppo["point"].to_list() == ["ppo-b1", "ppo-b0.1"]
    assert np.allclose(ppo["kl"], [0.3, 1.1]) and np.allclose(ppo["gold"], [0.2, 0.6])
    assert np.allclose(ppo["gold_se"], np.std([0.5, 0.7], ddof=1) / np.sqrt(2))
    assert ppo["n_seeds"].to_list() == [2, 2]
    lone = points.filter(pl.col("sweep") == "vbon-n8-exact")
    assert lone["gold_se"].to_list() == [0.02] and lone["n_seeds"].to_list() == [1]


def test_bon_curve_in_prompt_chunks_equals_the_whole_cache(tmp_path, config, monkeypatch):
    """The stage reads and reduces BON_CHUNK_PROMPTS prompts at a time; the chunks' means,
    weighted by their prompts, are the means over all prompts (ties, judges, n > pool)."""
    from pipeline_lib.stages import bon_curve as stage

    rng = np.random.default_rng(3)
    p, m = 11, 12
    gold = rng.integers(0, 5, size=(p, m)).astype(float)
    proxy = np.round(gold + rng.normal(size=(p, m)), 1)
    cfg = _config(config, m, 3, [1, 2, 4, 9, 12])
    whole = _bon(tmp_path, cfg, gold, proxy)
    for size in (4, 1):  # chunks of 4, 4, 3 prompts; one prompt at a time
        monkeypatch.setattr(stage, "BON_CHUNK_PROMPTS", size)
        chunked = _bon(tmp_path, cfg, gold, proxy)
        assert chunked.select("objective", "n", "win_rate_judges", "n_prompts",
                              "pool_size").equals(whole.select(
                                  "objective", "n", "win_rate_judges", "n_prompts", "pool_size"))
        for col in ("proxy", "gold", "kl_analytic", "kl_ties", "win_rate_ref"):
            np.testing.assert_allclose(chunked[col].fill_null(-1.0).to_numpy(),
                                       whole[col].fill_null(-1.0).to_numpy(), atol=1e-12)
        assert chunked.filter(pl.col("n") == 12)["win_rate_ref"].is_null().all()
    # a prompt short of samples is refused, naming the file and a prompt of its chunk
    monkeypatch.setattr(stage, "BON_CHUNK_PROMPTS", 4)
    short = _cache(gold, proxy).filter(~((pl.col("prompt_id") == "test-00009")
                                         & (pl.col("sample_idx") == 11)))
    write_table(short, tmp_path / "short.parquet", "rewards", {})
    with pytest.raises(StageError, match=r"short\.parquet \(gold\): prompt test-0000[89] has"):
        run_bon_curve(cfg, tmp_path / "short.parquet", None, tmp_path / "x.parquet")
