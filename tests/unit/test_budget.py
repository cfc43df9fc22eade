"""Budget accounting per run (pipeline_lib.stages.budget): hand-computed from the settings and
a training log."""

from __future__ import annotations

import copy

import polars as pl

from pipeline_lib.settings.config import validate_config
from pipeline_lib.settings.sections import Settings
from pipeline_lib.stages.budget import bon_budget, run_budget


def _settings(config, methods):
    cfg = copy.deepcopy(config)
    cfg["methods"] = methods
    return Settings.from_config(validate_config(cfg))


def _log(steps: int, length: float = 5.0) -> pl.DataFrame:
    return pl.DataFrame({"step": list(range(steps)), "response_length": [length] * steps,
                         "elapsed_s": [1.5 * (i + 1) for i in range(steps)]})


def test_a_ppo_family_run_counts_its_rollouts_and_its_cache(config):
    """tiny: 6 train prompts, M.train 8, 2 proxy seeds, rollout batch 6 (a run override: 3)."""
    s = _settings(config, [{"method": "vbon", "n": 4},
                           {"method": "ppo", "beta": 0.1, "overrides": {"rollout_batch_size": 3,
                                                                        "minibatch_size": 3}}])
    vbon = run_budget(s, s.methods["vbon-n4-exact"], _log(4))
    assert vbon == {"reference_samples": 6 * 8, "policy_samples": 4 * 6,
                    "tokens_generated": 4 * 6 * 5, "reward_model_calls": 4 * 6 * 2,
                    "train_steps": 4, "train_wall_s": 6.0}
    ppo = run_budget(s, s.methods["ppo-b0.1"], _log(2, 2.5))
    assert ppo["reference_samples"] == 0 and ppo["policy_samples"] == 2 * 3
    assert ppo["tokens_generated"] == 15 and ppo["reward_model_calls"] == 12


def test_a_pair_method_reads_n_cached_samples_per_prompt_and_draws_none(config):
    s = _settings(config, [{"method": "dpo", "n": 4, "beta": 0.1}, {"method": "bond", "n": 2}])
    dpo = run_budget(s, s.methods["dpo-n4-b0.1"], pl.DataFrame(
        {"step": [0, 1, 2], "elapsed_s": [0.1, 0.2, 0.3]}))
    assert dpo == {"reference_samples": 6 * 4, "policy_samples": 0, "tokens_generated": 0,
                   "reward_model_calls": 0, "train_steps": 3, "train_wall_s": 0.3}
    bond = run_budget(s, s.methods["bond-n2-w0.5"], _log(1))
    assert bond["reference_samples"] == 6 * 8  # its CDF reads every cached train sample


def test_a_bon_point_draws_n_samples_per_prompt_and_scores_each_with_every_member(config):
    s = _settings(config, [])
    assert bon_budget(s, 4, 10) == {"reference_samples": 40, "policy_samples": 0,
                                    "tokens_generated": None, "reward_model_calls": 80,
                                    "train_steps": 0, "train_wall_s": 0.0}
