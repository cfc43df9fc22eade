"""Config keys that are set but read by nothing (pipeline_lib.settings.inert)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from pipeline_lib.settings.config import validate_config
from pipeline_lib.settings.inert import describe_inert, inert_keys

ROOT = Path(__file__).resolve().parents[2]
TINY = yaml.safe_load((ROOT / "tests/data/tiny.yaml").read_text())


def inert(raw: dict) -> dict[str, str]:
    return dict(inert_keys(raw, validate_config(copy.deepcopy(raw))))


def with_(**sections) -> dict:
    raw = copy.deepcopy(TINY)
    for k, v in sections.items():
        raw[k] = {**raw[k], **v} if isinstance(v, dict) and isinstance(raw.get(k), dict) else v
    return raw


@pytest.mark.parametrize("name", ["config.yaml", "chat.yaml", "prs.yaml", "sweep.yaml"])
def test_the_shipped_configs_set_no_inert_key(name):
    raw = yaml.safe_load((ROOT / "config" / name).read_text())
    assert inert(raw) == {}


def test_the_tiny_test_config_sets_no_inert_key():
    assert inert(TINY) == {}


@pytest.mark.parametrize("sections, key, reason", [
    ({"sft": {"enabled": False, "lr": 0.1}, "policy": {"base": "org/model"}}, "sft.lr",
     "sft.enabled is false"),
    ({"policy": {"base": "org/model"}, "sft": {"enabled": False}}, "policy.vocab_size",
     "policy.base names a model"),
    ({"corpus": {"template": "{a}"}}, "corpus.template", "not 'prompt'"),
    ({"corpus": {"format": "prompt", "prompt_column": "q", "template": "{q}?",
                 "target_column": "a"}}, "corpus.prompt_column", "corpus.template builds"),
    ({"corpus": {"dataset_config": "x"}}, "corpus.dataset_config", "corpus.dataset is null"),
    ({"corpus": {"dataset": "org/data", "test_split": "test", "group_column": "g"}},
     "corpus.group_column", "corpus.test_split names the test split"),
    ({"corpus": {"format": "hh", "dataset": "org/hh"}}, "prompts.max_words", "not 'text_prefix'"),
    ({"generation": {"vllm": {"dtype": "bfloat16"}}}, "generation.vllm", "not 'vllm'"),
    ({"reference_cache": {"prompt_column": "q"}}, "reference_cache.prompt_column", "'generate'"),
    ({"gold": {"max_length": 64}}, "gold.max_length", "gold.type is 'vader'"),
    ({"reward_models": {"seeds": [], "lr": 0.1,
                        "pretrained": [{"name": "x", "model": "o/m"}]}},
     "reward_models.lr", "reward_models.seeds is empty"),
    ({"reward_models": {"seeds": [], "pretrained": [{"name": "x", "model": "o/m"}]},
      "preferences": {"label_noise": 0.2}}, "preferences.label_noise", "seeds is empty"),
    ({"cdf": {"objective": "mean", "uwo_lambda": 0.3}}, "cdf.uwo_lambda", "cdf.objective is"),
    ({"methods": [{"method": "dpo", "n": 4, "beta": 0.1}]}, "training.ppo", "no methods run"),
    ({"methods": [{"method": "vbon", "n": 4}]}, "training.preference", "no methods run"),
    ({"training": {"ppo": {"lr_final": 0.1}}}, "training.ppo.lr_final",
     "lr_schedule is 'constant'"),
    ({"prs_compare": {"enabled": False, "n_prompts": 3}}, "prs_compare.n_prompts",
     "prs_compare.enabled is false"),
    ({"prs_compare": {"instruction_data": {"dataset": "org/x"}}},
     "prs_compare.instruction_data", "not 'dataset'"),
    ({"default_target": "prs_compare"}, "methods", "only the random-vs-PRS comparison"),
])
def test_a_key_nothing_reads_is_reported_with_the_reason(sections, key, reason):
    found = inert(with_(**sections))
    assert key in found, found
    assert reason in found[key]
    assert any(line.startswith(f"config key {key} has no effect: ")
               for line in describe_inert(list(found.items())))


def test_only_keys_that_were_written_are_reported():
    """Defaults filled by the schema are not the user's: the same config with the inert key
    removed reports nothing."""
    raw = with_(policy={"base": "org/model"}, sft={"enabled": False})
    assert set(inert(raw)) == {"policy.vocab_size", "policy.n_layer", "policy.n_embd",
                               "policy.n_head", "policy.n_positions", "sft.epochs",
                               "sft.max_steps", "sft.batch_size", "sft.lr", "sft.max_length",
                               "sft.log_every", "sft.eval_every", "sft.checkpoint_every"}
    del raw["policy"]["vocab_size"]
    assert "policy.vocab_size" not in inert(raw)


def test_keys_that_are_read_are_not_reported():
    raw = with_(corpus={"format": "prompt", "dataset": "org/d", "template": "{q}",
                        "target_column": "a", "test_split": "test"},
                sft={"enabled": True})
    assert not {"corpus.template", "corpus.target_column", "corpus.dataset"} & set(inert(raw))
    # lr_final is read when one PPO-family run decays its rate, even by its own override
    raw = with_(training={"ppo": {"lr_final": 0.1}},
                methods=[{"method": "vbon", "n": 4, "overrides": {"lr_schedule": "cosine"}}])
    assert "training.ppo.lr_final" not in inert(raw)
