"""Budget accounting per method run, for the summary: what a run consumed to reach its point.

Per run (from its settings and its training log ``logs/train-<run>.parquet``):

* ``reference_samples``: cached reference samples its training reads per the train cache: the
  M samples of every train prompt for vbon/bond (their CDFs), the first n of every train prompt
  for the pair methods (dpo, ipo, bonbon, bon_sft; BOND's SFT half uses the same cache), none
  for ppo;
* ``policy_samples``: fresh samples the policy drew in training (rollout batch per PPO step;
  none for the preference methods);
* ``tokens_generated``: their response tokens (the log's mean response length per step);
* ``reward_model_calls``: proxy reward-model scorings of those samples (one per sample and
  ensemble member);
* ``train_steps`` and ``train_wall_s`` (the last logged ``elapsed_s``).

A BoN point draws ``n`` reference samples per test prompt at inference and scores each with
every member: its ``reference_samples`` and ``reward_model_calls`` are those totals, and it
trains nothing. Evaluation costs the same for every policy and is not counted.
"""

from __future__ import annotations

import polars as pl

from pipeline_lib.settings.methods import MethodRun
from pipeline_lib.settings.sections import Settings, as_dict

BUDGET_COLUMNS = ("reference_samples", "policy_samples", "tokens_generated",
                  "reward_model_calls", "train_steps", "train_wall_s")
BUDGET_TYPES = {**dict.fromkeys(BUDGET_COLUMNS[:-1], pl.Int64), "train_wall_s": pl.Float64}


def _members(s: Settings) -> int:
    """Proxy ensemble members (an imported cache's proxy columns)."""
    if s.reference_cache.imported:
        return len(s.reference_cache.proxies)
    return len(s.reward_models.member_names())


def run_budget(s: Settings, run: MethodRun, log: pl.DataFrame) -> dict[str, float | int]:
    """The budget columns of one run (see the module docstring)."""
    members = _members(s)
    n_train = s.prompts.n_train
    steps = int(log.height)
    if run.uses_cdf:
        reference = n_train * s.sampling.M.train
    elif run.uses_pairs:
        reference = n_train * int(run.n)
    else:
        reference = 0
    if run.is_ppo:
        batch = int({**as_dict(s.training.ppo), **run.overrides}["rollout_batch_size"])
        samples = steps * batch
        lengths = log["response_length"].fill_null(0.0) if "response_length" in log.columns \
            else pl.Series([0.0] * steps)
        tokens = int(round(float(lengths.sum()) * batch))
    else:
        samples = tokens = 0
    wall = float(log["elapsed_s"].max()) if steps else 0.0
    return {"reference_samples": int(reference), "policy_samples": int(samples),
            "tokens_generated": tokens, "reward_model_calls": int(samples * members),
            "train_steps": steps, "train_wall_s": wall}


def bon_budget(s: Settings, n: int, n_prompts: int) -> dict[str, float | int | None]:
    """A BoN point's inference budget: n samples per prompt, each scored by every member."""
    members = _members(s)
    return {"reference_samples": n * n_prompts, "policy_samples": 0, "tokens_generated": None,
            "reward_model_calls": n * n_prompts * members, "train_steps": 0,
            "train_wall_s": 0.0}
