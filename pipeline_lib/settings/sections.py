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
        inner = typing.get_args(hint)[0] if typing.get_args(hint) else None
        if inner is not None and dataclasses.is_dataclass(inner):
            return tuple(parse_section(inner, v, f"{key}[{i}]") for i, v in enumerate(value))
        return tuple(value)
    return value


def as_dict(section: Any) -> dict[str, Any]:
    """A settings dataclass as a plain dict (tuples as lists), e.g. for a trainer's config."""
    return {k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(section).items()}


@dataclass(frozen=True)
class ModelRef:
    """A model named in the config: a hub id or a local directory, with its revision and
    whether its own code may run. ``key`` is the config key that names it (for errors)."""

    name: str
    revision: str | None = None
    trust_remote_code: bool = False
    key: str = "model"


@dataclass(frozen=True)
class CorpusSettings:
    """``corpus``: where prompts and SFT data come from (the built-in corpus, a local file or
    a ``datasets.load_dataset`` source), in which format, with which columns."""

    format: str
    source: str
    path: str | None
    dataset: str | None
    dataset_config: str | None
    data_files: Any
    revision: str | None
    split: str
    test_split: str | None
    text_column: str
    group_column: str | None
    prompt_column: str
    target_column: str | None
    template: str | None
    chosen_column: str
    messages_column: str
    filter: Mapping[str, Any] | None
    min_words: int


@dataclass(frozen=True)
class PromptSettings:
    """``prompts``: how many prompts per split, and the prefix lengths of ``text_prefix``."""

    n_train: int
    n_test: int
    n_pref: int
    min_words: int
    max_words: int
    prefix_unit: str
    test_fraction: float
    preference: str | None


@dataclass(frozen=True)
class PolicySettings:
    """``policy``: the base model ('scratch' or a named causal LM) and the scratch GPT-2's shape."""

    base: str
    revision: str | None
    trust_remote_code: bool
    chat_template: str | bool
    vocab_size: int
    n_layer: int
    n_embd: int
    n_head: int
    n_positions: int

    @property
    def ref(self) -> ModelRef:
        """``policy.base`` as a model reference (not for 'scratch')."""
        return ModelRef(self.base, self.revision, self.trust_remote_code, "policy.base")


@dataclass(frozen=True)
class SFTSettings:
    """``sft``: training of the reference policy (``enabled`` false: policy.base is π_ref)."""

    enabled: bool
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
class CacheFiles:
    """``reference_cache.files``: the published cache file of each split (None: generated)."""

    train: str | None
    test: str | None

    def of(self, split: str) -> str | None:
        if split not in ("train", "test"):
            raise ConfigError(f"config key reference_cache.files has no split {split!r}")
        return getattr(self, split)


@dataclass(frozen=True)
class ReferenceCacheSettings:
    """``reference_cache``: the reference cache is generated (sample, gather, score) or
    imported from a published cache file per split (format, files, and which columns hold the
    prompt, the response, the gold reward and each proxy member ``rm-<name>``)."""

    source: str
    format: str | None
    files: CacheFiles
    prompt_column: str
    prompt_template: str | None
    response_column: str | None
    gold: str | None
    proxies: Mapping[str, str]

    @property
    def imported(self) -> bool:
        return self.source == "import"

    def splits(self) -> list[str]:
        """The splits read from a file (none unless imported)."""
        return [s for s in ("train", "test") if self.imported and self.files.of(s)]


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
class InstructionData:
    """``prs_compare.instruction_data``: a ``datasets.load_dataset`` source of instructions
    (read when ``prs_compare.instructions`` is ``dataset``)."""

    dataset: str | None
    dataset_config: str | None
    data_files: Any
    revision: str | None
    split: str
    column: str


@dataclass(frozen=True)
class PRSCompareSettings:
    """``prs_compare``: best-of-N with random sampling vs PRS on one model, prompts and scorer."""

    enabled: bool
    model: str
    revision: str | None
    trust_remote_code: bool
    instructions: str
    instruction_data: InstructionData
    n_prompts: int
    ns: tuple[int, ...]
    preference: str | None
    scorer: str
    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int
    batch_size: int

    @property
    def ref(self) -> ModelRef:
        """``prs_compare.model`` as a model reference (a hub id or directory, not sft/smollm2)."""
        return ModelRef(self.model, self.revision, self.trust_remote_code, "prs_compare.model")


@dataclass(frozen=True)
class ScorerSettings:
    """How a sequence classifier scores (prompt, response): the model, how it reads the pair
    (``input``: concat, template, pair or chat; ``template``), which score it gives (``label``,
    ``output``: auto, logit or probability) and how many tokens it reads (``max_length``)."""

    name: str
    model: str
    revision: str | None
    trust_remote_code: bool
    label: str | int | None
    output: str
    input: str
    template: str | None
    max_length: int
    key: str = "model"

    @property
    def ref(self) -> ModelRef:
        return ModelRef(self.model, self.revision, self.trust_remote_code, self.key)


@dataclass(frozen=True)
class GoldSettings:
    """``gold``: the gold scorer (VADER, or a classifier by hub id or local directory)."""

    type: str
    model: str | None
    revision: str | None
    trust_remote_code: bool
    label: str | int | None
    output: str
    input: str
    template: str | None
    max_length: int

    @property
    def scorer(self) -> ScorerSettings:
        """The classifier of ``type: hf`` as scorer settings (member name ``gold``)."""
        return ScorerSettings("gold", self.model or "", self.revision, self.trust_remote_code,
                              self.label, self.output, self.input, self.template,
                              self.max_length, "gold.model")


@dataclass(frozen=True)
class PretrainedRewardModel:
    """One entry of ``reward_models.pretrained``: a ready reward model, member ``rm-<name>``."""

    name: str
    model: str
    revision: str | None
    trust_remote_code: bool
    label: str | int | None
    output: str
    input: str
    template: str | None
    max_length: int


@dataclass(frozen=True)
class PreferenceDataSettings:
    samples_per_prompt: int
    label_noise: float


@dataclass(frozen=True)
class RewardModelSettings:
    """``reward_models``: the proxy ensemble: seeds trained (Bradley-Terry) from ``base``, and
    ready ``pretrained`` reward models."""

    seeds: tuple[int, ...]
    base: str
    revision: str | None
    trust_remote_code: bool
    input: str
    template: str | None
    pretrained: tuple[PretrainedRewardModel, ...]
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

    @property
    def base_ref(self) -> ModelRef | None:
        """The model the trained seeds start from; None for the SFT policy (``base: sft``)."""
        if self.base == "sft":
            return None
        return ModelRef(self.base, self.revision, self.trust_remote_code, "reward_models.base")

    def member_names(self) -> list[str]:
        """Every ensemble member: rm-seed<s> for the trained seeds, then rm-<name>."""
        return ([f"rm-seed{s}" for s in self.seeds]
                + [f"rm-{p.name}" for p in self.pretrained])

    def pretrained_scorers(self) -> list[ScorerSettings]:
        """The pretrained members as scorer settings (named rm-<name>)."""
        return [ScorerSettings(f"rm-{p.name}", p.model, p.revision, p.trust_remote_code, p.label,
                               p.output, p.input, p.template, p.max_length,
                               f"reward_models.pretrained[{i}].model")
                for i, p in enumerate(self.pretrained)]

    def seed_scorer(self, seed: int, path: str) -> ScorerSettings:
        """A trained seed (saved at ``path``) as scorer settings: one logit, read as trained."""
        return ScorerSettings(f"rm-seed{seed}", str(path), None, False, 0, "logit", self.input,
                              self.template, self.max_length, f"reward model rm-seed{seed}")


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
    lr_schedule: str
    lr_final: float
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
    """``training``: the trainers' settings, and ``seeds``, the default training seeds of every
    ``methods`` entry (an entry's own ``seeds`` wins; None: one run per setting, no seed)."""

    ppo: PPOSettings
    launch: LaunchSettings
    preference: PreferenceTrainerSettings
    seeds: tuple[int, ...] | None = None


@dataclass(frozen=True)
class EvaluationSettings:
    samples_per_prompt: int
    bon_ns: tuple[int, ...]
    win_rate_n: int
    uwo_lambdas: tuple[float, ...]
    # held-out reference samples per test prompt that every win_rate_ref is judged against
    # (None: a quarter of the test M, at least one); see judges()
    win_rate_judges: int | None = None

    def judges(self, m: int) -> int:
        """The number ``J`` of held-out judges of a test cache of ``m`` samples per prompt: the
        first ``J`` samples (by sample_idx) of each prompt; ``evaluation.win_rate_judges``, or
        ``max(1, m // 4)`` when it is null. The BoN points select from the other ``m - J``."""
        return self.win_rate_judges if self.win_rate_judges is not None else max(1, m // 4)


@dataclass(frozen=True)
class Settings:
    """The whole config, parsed: one typed section per key (``methods`` as validated runs).

    ``source`` is the validated config mapping itself, for the provenance hash and for handing
    a job to the processes of ``accelerate launch``."""

    task: str
    seed: int
    device: str
    threads: int
    default_target: str
    corpus: CorpusSettings
    prompts: PromptSettings
    policy: PolicySettings
    sft: SFTSettings
    generation: GenerationSettings
    sampling: SamplingSettings
    reference_cache: ReferenceCacheSettings
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
        runs = method_runs(config.get("methods") or [], keys, objective=parsed.cdf.objective,
                           uwo_lambda=parsed.cdf.uwo_lambda, seeds=parsed.training.seeds,
                           adaptive_kl=parsed.training.ppo.adaptive_kl)
        return dataclasses.replace(parsed, methods=runs, source=config)

