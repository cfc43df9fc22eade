"""Configuration: schema validation (with defaults), semantic checks and a stable hash."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEMA_PATH = REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """A config value is invalid; the message names the key."""


def check_config(config: Mapping[str, Any]) -> None:
    """Semantic checks the JSON schema cannot express. Raises :class:`ConfigError`."""
    p = config["prompts"]
    if p["max_words"] < p["min_words"]:
        raise ConfigError(
            f"config key prompts.max_words ({p['max_words']}) must be >= prompts.min_words "
            f"({p['min_words']})"
        )
    base = config["policy"]["base"]
    if base != "scratch" and not (Path(base) / "config.json").exists():
        raise ConfigError(
            f"config key policy.base: {base!r} is neither 'scratch' nor a local Hugging Face "
            "model directory (no config.json found)"
        )
    gold = config["gold"]
    if gold["type"] == "hf":
        if not gold.get("path") or not (Path(gold["path"]) / "config.json").exists():
            raise ConfigError(
                f"config key gold.path: {gold.get('path')!r} must be a local Hugging Face "
                "sequence-classification directory when gold.type is 'hf'"
            )
    corpus = config["corpus"]
    if corpus.get("path") is not None and not Path(corpus["path"]).exists():
        raise ConfigError(f"config key corpus.path: file {corpus['path']!r} does not exist")
    if config["sampling"]["shards"] > config["prompts"]["n_train"]:
        raise ConfigError(
            f"config key sampling.shards ({config['sampling']['shards']}) exceeds "
            f"prompts.n_train ({config['prompts']['n_train']})"
        )
    if config["generation"]["backend"] == "vllm":
        import importlib.util

        if config["generation"]["temperature"] > 2.0:
            raise ConfigError(
                f"config key generation.temperature ({config['generation']['temperature']}) "
                "must be at most 2 with generation.backend 'vllm' (vLLM refuses higher)"
            )
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError(
                "config key generation.backend is 'vllm' but vLLM is not installed; install the "
                "GPU extra: pip install -e '.[gpu]' (or bash setup.sh --gpu)"
            )
    from pipeline_lib.methods import method_runs  # validates every method run

    method_runs(config)
    from pipeline_lib.launch import check_launch

    check_launch(config)
    pol = config["policy"]
    if base == "scratch" and pol["n_embd"] % pol["n_head"]:
        raise ConfigError(
            f"config key policy.n_embd ({pol['n_embd']}) must be divisible by policy.n_head "
            f"({pol['n_head']})"
        )


def validate_config(config: dict[str, Any], schema_path: str | Path = SCHEMA_PATH) -> dict:
    """Validate against the JSON schema (filling defaults in place) and run semantic checks."""
    from snakemake.utils import validate

    validate(config, str(schema_path), set_default=True)
    check_config(config)
    return config


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> dict:
    """Read a YAML config, apply nested ``overrides``, validate and fill defaults."""
    with open(path) as fh:
        config = yaml.safe_load(fh) or {}
    if overrides:
        config = deep_update(config, overrides)
    return validate_config(config)


def deep_update(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict:
    out = copy.deepcopy(dict(base))
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_update(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def canonical(value: Any) -> Any:
    """``value`` with every mapping's keys sorted (recursively), lists kept in order.

    Snakemake compares a rule's params by ``repr``, in which a dict's key order shows; rules
    declare their config sections through this, so a YAML file whose keys are merely reordered
    reruns nothing."""
    if isinstance(value, Mapping):
        return {k: canonical(value[k]) for k in sorted(value, key=str)}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    return value


def config_hash(config: Mapping[str, Any], keys: list[str] | None = None) -> str:
    """sha256 (first 16 hex digits) of the canonical JSON of ``config`` (or of some sections)."""
    data = {k: config.get(k) for k in keys} if keys else dict(config)
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
