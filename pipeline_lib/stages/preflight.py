"""Preflight: every model the config names is found, and fits how the config uses it, before
the first job of a run starts.

The Snakefile's ``onstart`` handler runs :func:`check_models` (a real run only: ``snakemake -n``
plans without any model file). Each model is resolved through the Hugging Face cache
(:func:`pipeline_lib.models.hub.resolve_model`; a hub id not cached while ``HF_HUB_OFFLINE`` is
set fails with the command that downloads it), then checked from its config and tokenizer only
(no weights are loaded): a scorer's label exists, ``output: probability`` is not asked of a
one-label model (a constant), ``input: chat`` has a chat template to read.

On a cluster's login node (with network), resolve (and download) every model before
submitting::

    python -m pipeline_lib.stages.preflight --configfile config/my.yaml
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline_lib.models.hub import (
    ModelNotFoundError,
    ResolvedModel,
    download_command,
    resolve_model,
)
from pipeline_lib.models.labels import config_section, scorer_label
from pipeline_lib.settings.errors import ConfigError
from pipeline_lib.settings.sections import ModelRef, ScorerSettings, Settings

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def named_models(s: Settings) -> list[ModelRef]:
    """Every model the config names (models the pipeline builds itself left out): policy.base
    unless 'scratch', reward_models.base unless 'sft', each pretrained reward model, the gold
    classifier (gold.type hf), prs_compare.model when enabled (unless 'sft' or 'smollm2')."""
    refs = []
    if s.policy.base != "scratch":
        refs.append(s.policy.ref)
    if s.reward_models.base_ref is not None:
        refs.append(s.reward_models.base_ref)
    refs += [sc.ref for sc in s.reward_models.pretrained_scorers()]
    if s.gold.type == "hf":
        refs.append(s.gold.scorer.ref)
    c = s.prs_compare
    if c.enabled and c.model not in ("sft", "smollm2"):
        refs.append(c.ref)
    return refs


def named_scorers(s: Settings) -> list[ScorerSettings]:
    """The sequence classifiers the config names as scorers: pretrained members, then gold."""
    scorers = s.reward_models.pretrained_scorers()
    if s.gold.type == "hf":
        scorers.append(s.gold.scorer)
    return scorers


def _has_weights(path: Path) -> bool:
    return any(p.suffix in WEIGHT_SUFFIXES for p in path.iterdir() if p.is_file())


def _load_config(m: ResolvedModel):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(m.path, local_files_only=True,
                                          trust_remote_code=m.ref.trust_remote_code)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"config key {m.ref.key}: cannot read the model config of "
                          f"{m.ref.name!r} ({first})") from None


def _tokenizer(m: ResolvedModel):
    from pipeline_lib.models.loading import load_tokenizer

    try:
        return load_tokenizer(m.ref)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"config key {m.ref.key}: cannot load the tokenizer of "
                          f"{m.ref.name!r} ({first})") from None


def _check_chat(tokenizer, key: str, name: str) -> None:
    from pipeline_lib.models.encoding import uses_chat_template

    if not uses_chat_template(tokenizer):
        raise ConfigError(f"config key {key}: input 'chat' needs a chat template, but the "
                          f"tokenizer of {name!r} has none; use input 'concat', 'template' or "
                          "'pair'")


def _check_one(s: Settings, ref: ModelRef, resolved: dict[str, ResolvedModel]) -> None:
    m = resolve_model(ref)
    resolved[ref.key] = m
    if not _has_weights(m.path):
        hint = (f"download it with: {download_command(ref)}" if not m.is_local
                else "save it with save_pretrained")
        raise ConfigError(f"config key {ref.key}: {ref.name!r} has no weights "
                          f"(*.safetensors or *.bin) in {m.path}; {hint}")
    config = _load_config(m)
    for sc in named_scorers(s):
        if sc.key == ref.key:
            scorer_label(sc, int(config.num_labels), getattr(config, "id2label", None) or {})
            if sc.input == "chat":
                _check_chat(_tokenizer(m), f"{config_section(sc.key)}.input", sc.model)
    if ref.key == "policy.base" and s.policy.chat_template in (True, "true"):
        from pipeline_lib.models.encoding import apply_chat_setting

        try:
            apply_chat_setting(_tokenizer(m), True)
        except ValueError as exc:
            raise ConfigError(f"{exc} ({ref.name!r})") from None
    seeds_read_chat = s.reward_models.seeds and s.reward_models.input == "chat"
    rm_base = "reward_models.base" if s.reward_models.base_ref is not None else "policy.base"
    if seeds_read_chat and ref.key == rm_base:
        _check_chat(_tokenizer(m), "reward_models.input", ref.name)


def check_models(s: Settings | Mapping[str, Any]) -> dict[str, ResolvedModel]:
    """Resolve every model the config names (:func:`named_models`) and check it fits its use
    (see the module docstring). Returns config key -> resolved model; raises
    :class:`ConfigError` with one line per problem, each naming its config key."""
    s = Settings.from_config(s)
    resolved: dict[str, ResolvedModel] = {}
    problems: list[str] = []
    for ref in named_models(s):
        try:
            _check_one(s, ref, resolved)
        except (ConfigError, ModelNotFoundError) as exc:
            problems.append(str(exc))
    rm = s.reward_models
    if rm.seeds and rm.input == "chat" and rm.base_ref is None:
        if s.policy.base == "scratch" or s.policy.chat_template in (False, "false"):
            problems.append("config key reward_models.input: 'chat' needs a chat template, but "
                            "the seeds start from the SFT policy, whose tokenizer has none "
                            "(policy.base 'scratch' or policy.chat_template false)")
    if problems:
        raise ConfigError("\n".join(problems))
    return resolved


def describe(resolved: Mapping[str, ResolvedModel]) -> list[str]:
    """One line per resolved model: key, name, revision, snapshot and directory."""
    def revision(m: ResolvedModel) -> str:
        return "local directory" if m.is_local else f"revision {m.ref.revision or 'main'}"

    return [f"{key}: {m.ref.name} ({revision(m)}) snapshot {m.snapshot} at {m.path}"
            for key, m in resolved.items()]


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline_lib.stages.preflight --configfile X``: resolve (downloading when
    online and not cached) and check every model X names; print each one's snapshot."""
    from pipeline_lib.settings.config import load_config

    parser = argparse.ArgumentParser(prog="python -m pipeline_lib.stages.preflight",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--configfile", required=True, help="the pipeline's YAML config")
    args = parser.parse_args(argv)
    try:
        resolved = check_models(load_config(args.configfile))
    except Exception as exc:  # the schema (WorkflowError), config and model errors
        print(f"preflight: {args.configfile}:\n{exc}", file=sys.stderr)
        return 1
    lines = describe(resolved) or ["no named models (policy scratch, proxies from SFT, VADER)"]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
