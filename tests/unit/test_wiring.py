"""What a plausible wiring bug would change, pinned: GAE's gamma (and the trainer's gamma/lambda
order), BOND's w, the BoN point's win rate, the UWO curve of the trained ensemble, and each
method's KL-coefficient rule."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
import torch

from pipeline_lib.io.tables import read_polars, write_table
from pipeline_lib.math.ppo_math import gae_advantages
from pipeline_lib.math.winrate import win_rate
from pipeline_lib.settings.config import validate_config
from pipeline_lib.settings.errors import ConfigError
from pipeline_lib.settings.sections import Settings
from pipeline_lib.stages.bon_curve import run_bon_curve
from pipeline_lib.stages.reward_cache import configured_objective_name, uwo_curve_lambdas
from pipeline_lib.stages.train import ppo_config
from pipeline_lib.train.ppo.checkpoint import Cycler
from pipeline_lib.train.ppo.config import PPOConfig
from pipeline_lib.train.ppo.trainer import Rollout, rollout_advantages

# rewards [0, 0, 1], values [0.5, 0.6, 0.7], gamma 0.9, lambda 0.5, V_T = 0, by hand:
#   delta_2 = 1 - 0.7 = 0.3;           A_2 = 0.3
#   delta_1 = 0.9*0.7 - 0.6 = 0.03;    A_1 = 0.03 + 0.45*0.3 = 0.165
#   delta_0 = 0.9*0.6 - 0.5 = 0.04;    A_0 = 0.04 + 0.45*0.165 = 0.11425
ADV = [[0.11425, 0.165, 0.3]]
VALUES = [[0.5, 0.6, 0.7]]


def test_gae_with_a_discount_matches_the_hand_computed_recursion():
    adv, ret = gae_advantages(torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64),
                              torch.tensor(VALUES, dtype=torch.float64),
                              torch.ones(1, 3, dtype=torch.float64), gamma=0.9, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor(ADV, dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor([[0.61425, 0.765, 1.0]], dtype=torch.float64))


def test_the_ppo_trainer_passes_gamma_and_lambda_in_their_places():
    cfg = PPOConfig(steps=1, rollout_batch_size=1, minibatch_size=1, gamma=0.9, lam=0.5,
                    whiten_advantages=False, kl_coef=0.0)
    run = SimpleNamespace(cfg=cfg, acc=SimpleNamespace(device="cpu"), world=1)
    zeros = torch.zeros(1, 3)
    rollout = Rollout(batch=SimpleNamespace(mask=torch.ones(1, 3)), scores=np.array([1.0]),
                      old_logp=zeros, old_values=torch.tensor(VALUES), ref_logp=zeros,
                      ent_sum=0.0, beta=0.0)
    adv, _ = rollout_advantages(run, rollout)
    torch.testing.assert_close(adv, torch.tensor(ADV))


@pytest.fixture()
def settings(config) -> Settings:
    return Settings.from_config(config)


def _with(config: dict, **changes) -> Settings:
    cfg = copy.deepcopy(config)
    for key, value in changes.items():
        section, _, name = key.partition("__")
        cfg[section][name] = value
    return Settings.from_config(validate_config(cfg))


def test_bond_weighs_the_backward_term_by_w_and_the_sft_term_by_1_minus_w(config):
    cfg = copy.deepcopy(config)
    cfg["methods"] = [{"method": "bond", "n": 4, "w": 0.8}]
    s = Settings.from_config(validate_config(cfg))
    assert ppo_config(s, s.methods["bond-n4-w0.8"]).sft_weight == pytest.approx(0.2)


def test_the_trainer_mixes_bond_with_weight_1_minus_sft_weight_on_the_sft_term(monkeypatch):
    """`_minibatch_step` calls bond_loss(nll, ppo_loss, w) with w = 1 - sft_weight."""
    from pipeline_lib.train.ppo import trainer

    seen = []

    def spy(forward, backward, w):
        seen.append(w)
        raise StopIteration  # enough: the weight is what is checked

    monkeypatch.setattr(trainer, "bond_loss", spy)
    cfg = PPOConfig(steps=1, rollout_batch_size=1, minibatch_size=1, sft_weight=0.2)
    model = lambda ids, attn: (torch.zeros(1, ids.shape[1], 5, requires_grad=True),  # noqa: E731
                               torch.zeros(1, ids.shape[1]))
    batch = trainer.make_batch([[1, 2]], [[3, 4]], 0)
    run = SimpleNamespace(
        cfg=cfg, acc=SimpleNamespace(device="cpu"), world=1, rank=0, model=model, pad_id=0,
        sft_examples=[([1, 2], [3])],
        state=SimpleNamespace(sft_cycler=Cycler(1), rng=np.random.default_rng(0)))
    rollout = Rollout(batch=batch, scores=np.zeros(1), old_logp=torch.zeros(1, 2),
                      old_values=torch.zeros(1, 2), ref_logp=torch.zeros(1, 2), ent_sum=0.0,
                      beta=0.0)
    monkeypatch.setattr(trainer, "sft_token_nll", lambda m, b, cfg=None: torch.zeros(()))
    with pytest.raises(StopIteration):
        trainer._minibatch_step(run, rollout, torch.zeros(1, 2), torch.zeros(1, 2),
                                torch.tensor([0]), {k: [] for k in trainer.UPDATE_STATS})
    assert seen == [pytest.approx(0.8)]


def test_only_ppo_adapts_its_kl_coefficient(config):
    cfg = copy.deepcopy(config)
    cfg["training"]["ppo"]["adaptive_kl"] = True
    cfg["methods"] = [{"method": "ppo", "beta": 0.1}, {"method": "vbon", "n": 4},
                      {"method": "bond", "n": 4}]
    s = Settings.from_config(validate_config(cfg))
    assert ppo_config(s, s.methods["ppo-b0.1"]).adaptive_kl
    for name in ("vbon-n4-exact", "bond-n4-w0.5"):
        c = ppo_config(s, s.methods[name])
        assert not c.adaptive_kl and c.kl_coef == pytest.approx(1 / 3)
    cfg["methods"] = [{"method": "vbon", "n": 4, "overrides": {"adaptive_kl": True}}]
    with pytest.raises(ConfigError, match=r"methods\[0\].overrides.adaptive_kl"):
        validate_config(cfg)


def test_the_trained_uwo_lambda_always_has_its_bon_curve(config):
    """With several evaluation λ that omit cdf.uwo_lambda, its curve is added (it was a
    KeyError); with one λ the curve of the trained ensemble is named `uwo`."""
    s = _with(config, cdf__objective="uwo", cdf__uwo_lambda=2.0, evaluation__uwo_lambdas=[0.5, 1])
    assert uwo_curve_lambdas(s.cdf, s.evaluation.uwo_lambdas) == [0.5, 1.0, 2.0]
    assert configured_objective_name(s.cdf, s.evaluation.uwo_lambdas) == "uwo-l2"
    s = _with(config, cdf__objective="uwo", cdf__uwo_lambda=2.0, evaluation__uwo_lambdas=[2.0])
    assert configured_objective_name(s.cdf, s.evaluation.uwo_lambdas) == "uwo"
    s = _with(config, cdf__objective="mean", evaluation__uwo_lambdas=[0.5, 1])
    assert uwo_curve_lambdas(s.cdf, s.evaluation.uwo_lambdas) == [0.5, 1.0]


def _cache(p: int, m: int, seed: int = 0) -> pl.DataFrame:
    """A reward cache with continuous gold rewards and one proxy equal to gold."""
    rng = np.random.default_rng(seed)
    gold = rng.normal(size=(p, m))
    ids = [f"test-{i:05d}" for i in range(p) for _ in range(m)]
    idx = [j for _ in range(p) for j in range(m)]
    frames = [pl.DataFrame({"prompt_id": ids, "sample_idx": idx, "scorer": name, "kind": kind,
                            "reward": gold.ravel()})
              for name, kind in (("gold", "gold"), ("rm-seed1", "proxy"))]
    return pl.concat(frames).with_columns(pl.col("sample_idx").cast(pl.Int32))


def test_bon_points_win_rate_is_bon_against_a_reference_sample(tmp_path, config):
    """With the proxy equal to gold, the best of n beats a reference sample about n/(n+1) of
    the time (ties 1/2): the stage reports that, not its complement. The reference samples are
    the held-out judges (the first 64 // 4 = 16 of each prompt), the best of n is drawn from
    the other 48: n = 1 is their plain win rate against the judges."""
    write_table(_cache(200, 64), tmp_path / "rewards.parquet", "rewards", {})
    cfg = copy.deepcopy(config)
    cfg["evaluation"]["bon_ns"] = [1, 8]
    cfg["cdf"]["normalize"] = False
    run_bon_curve(cfg, tmp_path / "rewards.parquet", None, tmp_path / "bon.parquet")
    bon = read_polars(tmp_path / "bon.parquet", "bon_curve").filter(pl.col("objective") == "mean")
    win = dict(zip(bon["n"].to_list(), bon["win_rate_ref"].to_list(), strict=True))
    gold = np.random.default_rng(0).normal(size=(200, 64))  # _cache(200, 64)
    assert win[1] == pytest.approx(win_rate(gold[:, 16:], gold[:, :16]), abs=1e-12)
    assert win[1] == pytest.approx(0.5, abs=0.02)
    assert win[8] == pytest.approx(8 / 9, abs=0.02)
