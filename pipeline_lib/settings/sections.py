"""The config parsed once into small frozen dataclasses, one per section.

The JSON schema (``workflow/schemas/config.schema.yaml``) holds every default and every range;
it fills the defaults before :meth:`Settings.from_config` runs, so these classes declare no
defaults of their own. Parsing refuses a key a section does not have, naming it
(``config key training.ppo.lr_warmup: unknown key``), and a missing one. Library functions take
the section (or the few values) they use; stages take the root :class:`Settings`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Union

from pipeline_lib.settings.errors import ConfigError
from pipeline_lib.settings.methods import MethodRun, method_runs


def parse_section(cls: type, data: Any, key: str):
    """``cls`` (a settings dataclass) from a mapping; nested dataclasses and tuples follow their
    annotations. Raises :class:`ConfigError` naming ``key.<field>`` for an unknown or missing
    key."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"config key {key} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields), key=str)
    if unknown:
        raise ConfigError(f"config key {key}.{unknown[0]}: unknown key; {key} has "
                          f"{', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"config key {key}.{name} is missing")
            continue
        values[name] = _convert(hints[name], data[name], f"{key}.{name}")
    return cls(**values)


def _convert(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return None if value is None else _convert(inner[0], value, key)
    if dataclasses.is_dataclass(hint):
        return parse_section(hint, value, key)
    if origin is tuple and value is not None:
        return tuple(value)
    return value


def as_dict(section: Any) -> dict[str, Any]:
    """A settings dataclass as a plain dict (tuples as lists), e.g. for a trainer's config."""
    return {k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(section).items()}


@dataclass(frozen=True)
class CorpusSettings:
    """``corpus``: the text source the prompts are cut from, its columns and filter."""

    source: str
    path: str | None
    text_column: str
    group_column: str | None
    filter: Mapping[str, Any] | None
    min_words: int


@dataclass(frozen=True)
class PromptSettings:
    n_train: int
    n_test: int
    n_pref: int
    min_words: int
    max_words: int
    test_fraction: float
    preference: str | None


@dataclass(frozen=True)
class PolicySettings:
    base: str
    vocab_size: int
    n_layer: int
    n_embd: int
    n_head: int
    n_positions: int


@dataclass(frozen=True)
class SFTSettings:
    """``sft``: training of the reference policy."""

    epochs: int
    max_steps: int | None
    batch_size: int
    lr: float
    weight_decay: float
    warmup_steps: int
    max_length: int
    log_every: int
    eval_every: int
    checkpoint_every: int
    mixed_precision: str


@dataclass(frozen=True)
class VLLMSettings:
    tensor_parallel_size: int
    gpu_memory_utilization: float
    dtype: str


@dataclass(frozen=True)
class GenerationSettings:
    """``generation``: the sampling backend and parameters of π_ref and the trained policies."""

    backend: str
    vllm: VLLMSettings
    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int
    batch_size: int


@dataclass(frozen=True)
class SampleCounts:
    train: int
    test: int

    def of(self, split: str) -> int:
        """M of a split (``train`` or ``test``)."""
        if split not in ("train", "test"):
            raise ConfigError(f"config key sampling.M has no split {split!r}")
        return int(getattr(self, split))


@dataclass(frozen=True)
class SamplingSettings:
    strategy: str
    shards: int
    M: SampleCounts  # noqa: N815 (the config key)


@dataclass(frozen=True)
class PRSSettings:
    """``prs``: the PRS tree (layers, widths, preference, templates)."""

    layers: int
    widths: tuple[int, ...] | None
    preference: str | None
    first_template: str | None
    feedback_template: str | None
    refine_template: str | None
    feedback_max_new_tokens: int
    use_chat_template: bool


@dataclass(frozen=True)
class PRSCompareSettings:
    enabled: bool
    model: str
    instructions: str
    n_prompts: int
    ns: tuple[int, ...]
    preference: str | None
    scorer: str
    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int
    batch_size: int


@dataclass(frozen=True)
class GoldSettings:
    """``gold``: the gold scorer (VADER or a local classifier), its label and output."""

    type: str
    path: str | None
    label: str | int | None
    output: str


@dataclass(frozen=True)
class PreferenceDataSettings:
    samples_per_prompt: int
    label_noise: float


@dataclass(frozen=True)
class RewardModelSettings:
    """``reward_models``: the seeds of the proxy ensemble and their Bradley-Terry training."""

    seeds: tuple[int, ...]
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_steps: int
    center_coef: float
    val_fraction: float
    max_length: int
    log_every: int
    checkpoint_every: int
    mixed_precision: str


@dataclass(frozen=True)
class ScoringSettings:
    batch_size: int


@dataclass(frozen=True)
class CDFSettings:
    """``cdf``: the ensemble objective of the proxy reward, its normalisation and curve fit."""

    objective: str
    uwo_lambda: float
    normalize: bool
    curvefit: bool


@dataclass(frozen=True)
class PPOSettings:
    """``training.ppo``: the PPO trainer's settings shared by the ppo, vbon and bond runs."""

    steps: int
    rollout_batch_size: int
    minibatch_size: int
    ppo_epochs: int
    lr: float
    adaptive_kl: bool
    kl_target: float
    kl_horizon: int
    clip: float
    value_clip: float
    vf_coef: float
    gamma: float
    lam: float
    reward_clip: float | None
    whiten_advantages: bool
    trainable_top_layers: int | None
    checkpoint_every: int
    log_every: int
    mixed_precision: str


@dataclass(frozen=True)
class LaunchSettings:
    """``training.launch``: how many processes a training job runs, under which accelerate config."""

    accelerate_config: str | None
    num_processes: int


@dataclass(frozen=True)
class PreferenceTrainerSettings:
    """``training.preference``: the trainer of the dpo, ipo, bonbon and bon_sft runs."""

    epochs: int
    max_steps: int | None
    batch_size: int
    lr: float
    weight_decay: float
    warmup_steps: int
    max_grad_norm: float | None
    checkpoint_every: int
    log_every: int
    mixed_precision: str


@dataclass(frozen=True)
class TrainingSettings:
    ppo: PPOSettings
    launch: LaunchSettings
    preference: PreferenceTrainerSettings


@dataclass(frozen=True)
class EvaluationSettings:
    samples_per_prompt: int
    bon_ns: tuple[int, ...]
    win_rate_n: int
    uwo_lambdas: tuple[float, ...]


@dataclass(frozen=True)
class Settings:
    """The whole config, parsed: one typed section per key (``methods`` as validated runs).

    ``source`` is the validated config mapping itself, for the provenance hash and for handing
    a job to the processes of ``accelerate launch``."""

    task: str
    seed: int
    device: str
    threads: int
    corpus: CorpusSettings
    prompts: PromptSettings
    policy: PolicySettings
    sft: SFTSettings
    generation: GenerationSettings
    sampling: SamplingSettings
    prs: PRSSettings
    prs_compare: PRSCompareSettings
    gold: GoldSettings
    preferences: PreferenceDataSettings
    reward_models: RewardModelSettings
    scoring: ScoringSettings
    cdf: CDFSettings
    training: TrainingSettings
    evaluation: EvaluationSettings
    methods: Mapping[str, MethodRun] = field(default_factory=dict, compare=False)
    source: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Settings) -> Settings:
        """Parse a schema-validated config (defaults filled); a :class:`Settings` passes
        through. Raises :class:`ConfigError` naming the first unknown or missing key."""
        if isinstance(config, Settings):
            return config
        sections = {k: v for k, v in config.items() if k not in ("methods", "source")}
        parsed = parse_section(cls, sections, "config")
        keys = {"ppo": {f.name for f in dataclasses.fields(PPOSettings)},
                "preference": {f.name for f in dataclasses.fields(PreferenceTrainerSettings)}}
        runs = method_runs(config.get("methods") or [], keys)
        return dataclasses.replace(parsed, methods=runs, source=config)

