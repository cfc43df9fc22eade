import copy
from pathlib import Path

import pytest
import yaml

from pipeline_lib.settings.config import canonical, config_hash, load_config, validate_config
from pipeline_lib.settings.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def default():
    return yaml.safe_load((ROOT / "config/config.yaml").read_text())


def test_default_config_validates_and_fills_defaults():
    cfg = validate_config(default())
    assert cfg["sft"]["warmup_steps"] == 20  # filled from the schema default
    assert cfg["reward_models"]["val_fraction"] == 0.1
    assert cfg["cdf"]["objective"] == "mean"


def test_minimal_config_gets_every_section():
    cfg = validate_config({"task": "t", "seed": 1})
    assert cfg["sampling"]["M"] == {"train": 32, "test": 64}
    assert cfg["gold"]["type"] == "vader"


@pytest.mark.parametrize(
    "override, message",
    [
        ({"cdf": {"objective": "median"}}, "median"),
        ({"sampling": {"M": {"train": 1}}}, "minimum"),
        ({"prompts": {"max_words": 1, "min_words": 3}}, "prompts.max_words"),
        ({"policy": {"base": "not a model!"}}, "policy.base"),
        ({"gold": {"type": "hf", "model": None}}, "gold.model"),
        ({"corpus": {"path": "/nonexistent.csv"}}, "corpus.path"),
        ({"unknown_key": 1}, "unknown_key"),
        ({"policy": {"n_embd": 130, "n_head": 4}}, "policy.n_embd"),
        ({"corpus": {"format": "prompt", "target_column": None}}, "corpus.target_column"),
        ({"policy": {"chat_template": True}}, "policy.chat_template"),
        ({"gold": {"type": "vader", "input": "pair"}}, "gold.input"),
        ({"generation": {"top_p": 0.9}}, "generation.top_p: the trained methods need"),
        ({"generation": {"top_k": 50}}, "generation.top_k: the trained methods need"),
    ],
)
def test_bad_values_name_the_key(override, message):
    cfg = default()
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k].update(v)
        else:
            cfg[k] = v
    with pytest.raises(Exception, match=message):
        validate_config(cfg)


def test_load_config_with_overrides_and_hash(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(default()))
    a = load_config(path)
    b = load_config(path, {"cdf": {"objective": "wco"}})
    assert b["cdf"]["objective"] == "wco" and b["cdf"]["uwo_lambda"] == 0.5
    assert config_hash(a) == config_hash(copy.deepcopy(a))
    assert config_hash(a) != config_hash(b)
    with pytest.raises(ConfigError):
        load_config(path, {"prompts": {"max_words": 1}})


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"method": "rlhf", "beta": 0.1}, "'rlhf' is not one of"),
        ({"method": "vbon", "n": 1}, "minimum"),
        ({"method": "dpo", "n": 8, "beta": 0}, r"methods\[1\].beta must be > 0"),
        ({"method": "dpo", "n": 8, "beta": -1}, "minimum"),
        ({"method": "vbon", "n": 8, "bound": "l2"}, "'l2' is not one of"),
        ({"method": "vbon"}, r"methods\[1\].n is required"),
        ({"method": "ppo", "beta": 0.1, "n": 8}, r"methods\[1\].n has no meaning"),
        ({"method": "ppo", "beta": 0.1, "overrides": {"stepz": 3}}, r"methods\[1\].overrides"),
        ({"method": "ppo", "beta": 0.05}, "used twice"),
    ],
)
def test_bad_method_runs_fail_at_validation(entry, message):
    cfg = default()
    cfg["methods"] = [{"method": "ppo", "beta": 0.05}, entry]
    with pytest.raises(Exception, match=message):
        validate_config(cfg)


def test_method_run_names():
    from pipeline_lib.settings.sections import Settings

    names = list(Settings.from_config(validate_config(default())).methods)
    assert names == ["ppo-b0.05", "vbon-n8-exact", "bond-n8-w0.5", "dpo-n8-b0.1", "ipo-n8-b0.1",
                     "bonbon-n8", "bon_sft-n8"]


def test_canonical_sections_do_not_depend_on_key_order():
    """Rules declare their config sections as params through canonical(); Snakemake compares
    params by repr, so a reordered config must give the same repr (and a changed one not)."""
    a = {"b": 1, "a": {"y": [2, {"q": 1, "p": 0}], "x": None}}
    b = {"a": {"x": None, "y": [2, {"p": 0, "q": 1}]}, "b": 1}
    assert repr(a) != repr(b) and repr(canonical(a)) == repr(canonical(b))
    assert repr(canonical(a)) != repr(canonical({**b, "b": 2}))
    assert canonical({"l": [3, 1, 2]}) == {"l": [3, 1, 2]}  # list order is meaning


@pytest.mark.parametrize("section, key", [
    ("training.ppo", "lr_warmup"), ("training.preference", "epoch"), ("generation.vllm", "tp"),
    ("sampling.M", "val"),
])
def test_an_unknown_key_in_any_section_fails_at_parse_time_naming_it(section, key):
    """A typo in a trainer section fails when the config is checked (before any job runs), not
    when a train job starts."""
    cfg = default()
    node = cfg
    for part in section.split("."):
        node = node.setdefault(part, {})
    node[key] = 1
    with pytest.raises(Exception) as err:
        validate_config(cfg)
    message = str(err.value)  # the schema's or the settings parser's: both name the key
    assert f"{section}.{key}" in message or (
        f"'{key}' was unexpected" in message
        and all(f"['{s}']" in message for s in section.split(".")))


def test_settings_are_frozen_sections_of_the_validated_config():
    from pipeline_lib.settings.sections import CDFSettings, Settings

    s = Settings.from_config(validate_config(default()))
    assert isinstance(s.cdf, CDFSettings) and s.cdf.objective == "mean"
    assert s.sampling.M.of("test") == 64 and s.training.ppo.steps == 40
    assert s.evaluation.bon_ns == (1, 2, 4, 8, 16, 32, 64)
    with pytest.raises(AttributeError):
        s.cdf.objective = "wco"  # frozen
    assert Settings.from_config(s) is s


def test_the_readme_format_examples_are_valid_configs(tmp_path):
    """Each config of README's "Your own models and data" validates as it stands (every key
    exists, the checks pass; hub ids need no file to plan)."""
    import re

    import yaml

    from pipeline_lib.settings.config import load_config

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text.split("## Your own models and data", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```yaml\n(.*?)```", section, re.S)
    assert len(blocks) == 4
    for i, block in enumerate(blocks):
        config = yaml.safe_load(block)
        path = tmp_path / f"example{i}.yaml"
        path.write_text(yaml.safe_dump(config))
        loaded = load_config(path)
        assert loaded["corpus"]["format"] in block
