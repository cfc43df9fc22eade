"""Configuration: schema validation (with defaults), semantic checks and a stable hash."""

from __future__ import annotations

import copy
import hashlib
import json
import re
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from pipeline_lib.settings.errors import ConfigError
from pipeline_lib.settings.launch import check_launch
from pipeline_lib.settings.paths import SCHEMA_PATH
from pipeline_lib.settings.sections import CorpusSettings, Settings


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
    _check_models(s)
    problem = sft_target_problem(s.corpus) if s.sft.enabled else None
    if problem is not None:
        raise ConfigError(problem)
    if base == "scratch" and s.prompts.prefix_unit == "tokens":
        raise ConfigError("config key prompts.prefix_unit is 'tokens' but policy.base is "
                          "'scratch', whose tokenizer sft trains after the prompts are cut; "
                          "use words, or name a model in policy.base")
    if base == "scratch" and s.policy.chat_template is True:
        raise ConfigError("config key policy.chat_template is true but policy.base 'scratch' "
                          "trains a tokenizer without a chat template")
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
    g = s.generation
    if s.methods and (g.top_p < 1 or g.top_k > 0):
        key = "generation.top_p" if g.top_p < 1 else "generation.top_k"
        raise ConfigError(
            f"config key {key}: the trained methods need untruncated sampling (top_p 1, top_k 0): "
            "under top-p/top-k a policy's sample can lie outside pi_ref's support, where "
            "log pi_ref = -inf and the KL is infinite; temperature alone is fine")
    check_reference_cache(s)
    check_win_rate_judges(s)
    if base == "scratch" and s.policy.n_embd % s.policy.n_head:
        raise ConfigError(
            f"config key policy.n_embd ({s.policy.n_embd}) must be divisible by policy.n_head "
            f"({s.policy.n_head})"
        )
    return s


def check_win_rate_judges(s: Settings) -> None:
    """The held-out judges of the win rates leave at least one test sample per prompt to the
    BoN pool: ``evaluation.win_rate_judges < sampling.M.test``."""
    judges, m = s.evaluation.win_rate_judges, s.sampling.M.test
    if judges is not None and judges >= m:
        raise ConfigError(
            f"config key evaluation.win_rate_judges ({judges}) must be below sampling.M.test "
            f"({m}): the first win_rate_judges reference samples of each test prompt are held "
            "out as the judges of every win_rate_ref, and the BoN points select from the rest")


# huggingface_hub's repo id rules (huggingface_hub.utils.validate_repo_id), restated here so
# that planning a run imports no hub client: "name" or "org/name" of ASCII letters, digits,
# "-", "_" and ".", at most 96 characters each, no "--" or "..", not ending in ".git".
_REPO_ID = re.compile(r"(\b[\w\-.]{1,96}\b/)?\b[\w\-.]{1,96}\b", re.ASCII)


def is_hub_id(name: str) -> bool:
    """Whether ``name`` is a syntactically valid Hugging Face model repo id (no file access)."""
    return (isinstance(name, str) and name.count("/") <= 1 and _REPO_ID.fullmatch(name) is not None
            and "--" not in name and ".." not in name and not name.endswith(".git"))


def looks_like_path(name: str) -> bool:
    """Whether a model name is written as a filesystem path (absolute, ``./``, ``../``, ``~``,
    or with more than one ``/``) rather than a hub id."""
    return (name.startswith(("/", "./", "../", "~"))
            or (name.count("/") > 1 and "//" not in name and " " not in name))


def _check_model_name(name: str, key: str, special: tuple[str, ...] = ()) -> None:
    """A model is named by an existing local model directory or a hub id (checked for syntax
    only: planning needs no model file; the run's preflight resolves it)."""
    if name in special:
        return
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"config key {key}: directory {name!r} is not a Hugging Face model "
                              "directory (no config.json)")
        return
    if looks_like_path(name):
        return  # a local directory made before the run (checked by the run's preflight)
    if not is_hub_id(name):
        options = "".join(f"{o!r}, " for o in special)
        raise ConfigError(f"config key {key}: {name!r} is neither {options}an existing local "
                          "model directory nor a Hugging Face hub id (name or org/name)")


def check_scorer_input(key: str, input_: str, template: str | None) -> None:
    """``<key>.input`` 'template' needs ``<key>.template`` with {response} (and {prompt}) and
    no other slot; a template is set only with input 'template'."""
    if input_ != "template":
        if template is not None:
            raise ConfigError(f"config key {key}.template is set but {key}.input is {input_!r} "
                              "(a template is read only with input 'template')")
        return
    if not template:
        raise ConfigError(f"config key {key}.template is required with {key}.input 'template' "
                          "(e.g. 'Human: {prompt}\\n\\nAssistant: {response}')")
    try:
        slots = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as exc:
        raise ConfigError(f"config key {key}.template: {exc}") from None
    unknown = sorted(slots - {"prompt", "response"})
    if unknown:
        raise ConfigError(f"config key {key}.template names slot {{{unknown[0]}}}; a scorer "
                          "template has only {prompt} and {response}")
    if "response" not in slots:
        raise ConfigError(f"config key {key}.template must contain {{response}}")


def _check_models(s: Settings) -> None:
    """Every model the config names, and how each scorer reads (prompt, response)."""
    _check_model_name(s.policy.base, "policy.base", ("scratch",))
    if not s.sft.enabled and s.policy.base == "scratch":
        raise ConfigError("config key sft.enabled is false but policy.base is 'scratch': a "
                          "policy trained from scratch needs SFT (or name a ready model in "
                          "policy.base)")
    g = s.gold
    if g.type == "hf":
        if not g.model:
            raise ConfigError("config key gold.model is required when gold.type is 'hf' (a "
                              "sequence classifier by hub id or local directory)")
        _check_model_name(g.model, "gold.model")
        check_scorer_input("gold", g.input, g.template)
    elif g.input != "concat" or g.template is not None:
        raise ConfigError(f"config key gold.input: the {g.type} gold scorer reads prompt + "
                          "response as one text; input and template are for gold.type 'hf'")
    rm = s.reward_models
    _check_model_name(rm.base, "reward_models.base", ("sft",))
    check_scorer_input("reward_models", rm.input, rm.template)
    if not rm.seeds and not rm.pretrained:
        raise ConfigError("config key reward_models: the proxy ensemble has no member; set "
                          "reward_models.seeds and/or reward_models.pretrained")
    names = [f"seed{x}" for x in rm.seeds]
    for i, p in enumerate(rm.pretrained):
        key = f"reward_models.pretrained[{i}]"
        if p.name in names:
            raise ConfigError(f"config key {key}.name: member rm-{p.name} is already in the "
                              "ensemble (names must be unique and not seed<N>)")
        names.append(p.name)
        _check_model_name(p.model, f"{key}.model")
        check_scorer_input(key, p.input, p.template)
    c = s.prs_compare
    if s.default_target == "prs_compare" and not c.enabled:
        raise ConfigError("config key default_target is 'prs_compare' but prs_compare.enabled "
                          "is false")
    if c.enabled:
        _check_model_name(c.model, "prs_compare.model", ("sft", "smollm2"))
        if c.instructions == "dataset" and not c.instruction_data.dataset:
            raise ConfigError("config key prs_compare.instruction_data.dataset is required with "
                              "prs_compare.instructions 'dataset' (e.g. tatsu-lab/alpaca_eval "
                              "with data_files: alpaca_eval.json)")


def check_reference_cache(s: Settings) -> None:
    """``reference_cache.source: import``: a format, an existing file per imported split, the
    gold and proxy columns the stages read, and no method run (an imported cache has no
    reference log-probs or token ids, and no reward models to score a policy's samples)."""
    c = s.reference_cache
    if not c.imported:
        return
    key = "config key reference_cache"
    if c.format is None:
        raise ConfigError(f"{key}.format is required with reference_cache.source 'import' "
                          "(vbon_samples, vbon_prompts or ensembles)")
    if not c.splits():
        raise ConfigError(f"{key}.files: no file; reference_cache.source 'import' reads "
                          "files.train and/or files.test")
    for split in c.splits():
        if not Path(c.files.of(split)).expanduser().exists():
            raise ConfigError(f"{key}.files.{split}: {c.files.of(split)!r} does not exist")
    if not c.proxies:
        raise ConfigError(f"{key}.proxies is empty: name at least one proxy column (member "
                          "rm-<name>), e.g. {reward: reward}; the CDFs and BoN curves select by it")
    if c.files.test and c.gold is None:
        raise ConfigError(f"{key}.gold is null but files.test is set: the BoN curves of the "
                          "test cache need a gold column (it may also be a proxy column)")
    if s.cdf.normalize and not c.files.train:
        raise ConfigError("config key cdf.normalize is true but reference_cache.files.train is "
                          "null: the z-normalisation reads the imported train cache")
    for name, run in s.methods.items():
        if run.uses_pairs:
            need = ("trains on best/worst-of-n pairs, which need the reference log-probs "
                    "(samples column ref_logprob) and token ids (response_token_ids) of the "
                    "cached samples")
        else:
            need = ("trains a policy by PPO, which samples from pi_ref and scores its samples "
                    "with the proxy reward models; an imported cache has rewards, not reward "
                    "models, and no reference log-probs (samples column ref_logprob)")
        raise ConfigError(
            f"config key methods: run {name!r} (method {run.method}) {need}; the "
            f"{c.format} cache imported by reference_cache has none. Remove the run "
            "(methods: []) or set reference_cache.source: generate")


def sft_target_problem(cfg: CorpusSettings) -> str | None:
    """Why format ``corpus.format`` gives no SFT target whatever the data (None when it can)."""
    if cfg.format == "prompt" and cfg.target_column is None:
        return ("config key corpus.target_column is null, so format 'prompt' has no SFT target, "
                "but sft.enabled is true; set corpus.target_column or sft.enabled: false")
    return None


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
