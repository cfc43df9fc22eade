"""Configuration: schema validation (with defaults), semantic checks and a stable hash."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from pipeline_lib.settings.errors import ConfigError
from pipeline_lib.settings.launch import check_launch
from pipeline_lib.settings.paths import SCHEMA_PATH
from pipeline_lib.settings.sections import Settings


def check_config(config: Mapping[str, Any]) -> Settings:
    """Parse a schema-validated config into :class:`Settings` and run the checks the JSON schema
    cannot express. Raises :class:`ConfigError` naming the key; returns the settings."""
    s = Settings.from_config(config)
    if s.prompts.max_words < s.prompts.min_words:
        raise ConfigError(
            f"config key prompts.max_words ({s.prompts.max_words}) must be >= prompts.min_words "
            f"({s.prompts.min_words})"
        )
    base = s.policy.base
    if base != "scratch" and not (Path(base) / "config.json").exists():
        raise ConfigError(
            f"config key policy.base: {base!r} is neither 'scratch' nor a local Hugging Face "
            "model directory (no config.json found)"
        )
    if s.gold.type == "hf" and (not s.gold.path or not (Path(s.gold.path) / "config.json").exists()):
        raise ConfigError(
            f"config key gold.path: {s.gold.path!r} must be a local Hugging Face "
            "sequence-classification directory when gold.type is 'hf'"
        )
    if s.corpus.path is not None and not Path(s.corpus.path).exists():
        raise ConfigError(f"config key corpus.path: file {s.corpus.path!r} does not exist")
    if s.sampling.shards > s.prompts.n_train:
        raise ConfigError(
            f"config key sampling.shards ({s.sampling.shards}) exceeds "
            f"prompts.n_train ({s.prompts.n_train})"
        )
    if s.generation.backend == "vllm":
        _check_vllm(s.generation.temperature)
    check_launch(s.training.launch, s.training.ppo, s.methods.values())
    if base == "scratch" and s.policy.n_embd % s.policy.n_head:
        raise ConfigError(
            f"config key policy.n_embd ({s.policy.n_embd}) must be divisible by policy.n_head "
            f"({s.policy.n_head})"
        )
    return s


def _check_vllm(temperature: float) -> None:
    import importlib.util

    if temperature > 2.0:
        raise ConfigError(
            f"config key generation.temperature ({temperature}) "
            "must be at most 2 with generation.backend 'vllm' (vLLM refuses higher)"
        )
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "config key generation.backend is 'vllm' but vLLM is not installed; install the "
            "GPU extra: pip install -e '.[gpu]' (or bash setup.sh --gpu)"
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
