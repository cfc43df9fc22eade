"""Config keys that are set but read by nothing, given the rest of the config.

The JSON schema refuses unknown keys; this module finds the *known* keys that have no effect in
a given config: ``sft.lr`` with ``sft.enabled: false``, ``corpus.template`` with a format other
than ``prompt``, ``training.ppo`` without a PPO-family run, and so on. Such a key is almost
always a mistake (a recipe that believes it sets a value it does not), so the Snakefile prints
one warning per key before planning, and the recipe tests require none.

:func:`inert_keys` takes the config as the user wrote it (before the schema fills defaults,
so only keys that were really set are reported) and its parsed :class:`Settings`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from pipeline_lib.settings.sections import Settings

# keys of reward_models that only the trained seeds read
_SEED_KEYS = ("base", "revision", "trust_remote_code", "input", "template", "epochs",
              "batch_size", "lr", "weight_decay", "warmup_steps", "center_coef", "val_fraction",
              "max_length", "log_every", "checkpoint_every", "mixed_precision")
_SCRATCH_KEYS = ("vocab_size", "n_layer", "n_embd", "n_head", "n_positions")
_DATASET_KEYS = ("dataset_config", "data_files", "revision", "split", "test_split")


def _is_set(raw: Mapping[str, Any], dotted: str) -> bool:
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def _children(raw: Mapping[str, Any], section: str, keep: tuple[str, ...] = ()) -> list[str]:
    """Dotted names of the keys set under ``section`` (all but ``keep``)."""
    node = raw.get(section)
    if not isinstance(node, Mapping):
        return []
    return [f"{section}.{k}" for k in node if k not in keep]


Rule = tuple[list[str], "str | None"]  # (keys, why they are inert; None: they are read)


def _rules(raw: Mapping[str, Any], s: Settings) -> Iterator[Rule]:
    """Every rule, section by section."""
    yield from _data_rules(s)
    yield from _model_rules(raw, s)
    yield from _method_rules(s)


def _data_rules(s: Settings) -> Iterator[Rule]:
    """corpus and prompts: the keys of other formats and sources."""
    c = s.corpus
    fmt = c.format
    yield ["corpus.source"], ("corpus.path or corpus.dataset is set"
                              if c.path is not None or c.dataset is not None else None)
    yield [f"corpus.{k}" for k in _DATASET_KEYS], (
        None if c.dataset is not None else "corpus.dataset is null (these are load_dataset's)")
    by_split = c.dataset is not None and c.test_split is not None
    why = "corpus.test_split names the test split (no groups are held out)"
    yield ["prompts.test_fraction"], why if by_split else None
    yield ["corpus.group_column"], why if by_split and c.group_column is not None else None
    not_prefix = None if fmt == "text_prefix" else f"corpus.format is {fmt!r}, not 'text_prefix'"
    yield ["corpus.text_column", "corpus.min_words", "prompts.min_words", "prompts.max_words",
           "prompts.prefix_unit"], not_prefix
    not_prompt = None if fmt == "prompt" else f"corpus.format is {fmt!r}, not 'prompt'"
    yield ["corpus.template"], not_prompt
    yield ["corpus.target_column"], not_prompt or (
        None if s.sft.enabled else "sft.enabled is false (the target is the SFT data)")
    yield ["corpus.prompt_column"], not_prompt or (
        "corpus.template builds the prompt" if c.template is not None else None)
    yield ["corpus.chosen_column"], None if fmt == "hh" else f"corpus.format is {fmt!r}, not 'hh'"
    yield ["corpus.messages_column"], (None if fmt == "messages"
                                       else f"corpus.format is {fmt!r}, not 'messages'")


def _model_rules(raw: Mapping[str, Any], s: Settings) -> Iterator[Rule]:
    """policy, sft, generation, the reference cache, PRS, gold and the reward models."""
    scratch = s.policy.base == "scratch"
    yield [f"policy.{k}" for k in _SCRATCH_KEYS], (
        None if scratch else "policy.base names a model (these shape the scratch GPT-2)")
    yield ["policy.revision", "policy.trust_remote_code"], (
        "policy.base is 'scratch'" if scratch else None)
    yield _children(raw, "sft", ("enabled",)), (
        None if s.sft.enabled else "sft.enabled is false")
    yield ["generation.vllm"], (None if s.generation.backend == "vllm"
                                else "generation.backend is not 'vllm'")

    imported = s.reference_cache.imported
    yield _children(raw, "reference_cache", ("source",)), (
        None if imported else "reference_cache.source is 'generate'")
    yield _children(raw, "prs"), (
        None if s.sampling.strategy == "prs" or s.prs_compare.enabled
        else "sampling.strategy is not 'prs' and prs_compare.enabled is false")
    pc = s.prs_compare
    yield _children(raw, "prs_compare", ("enabled",)), (
        None if pc.enabled else "prs_compare.enabled is false")
    yield ["prs_compare.instruction_data"], (
        None if pc.instructions == "dataset" or not pc.enabled
        else f"prs_compare.instructions is {pc.instructions!r}, not 'dataset'")
    yield _children(raw, "gold", ("type",)), (
        None if s.gold.type == "hf" else f"gold.type is {s.gold.type!r}, not 'hf'")

    rm = s.reward_models
    no_seeds = ("reference_cache.source is 'import' (the proxies are columns of the file)"
                if imported else None if rm.seeds else "reward_models.seeds is empty")
    yield [f"reward_models.{k}" for k in _SEED_KEYS], no_seeds
    yield _children(raw, "preferences"), no_seeds
    yield ["prompts.n_pref"], no_seeds
    yield ["reward_models.pretrained"], (
        "reference_cache.source is 'import' (the proxies are columns of the file)"
        if imported else None)


def _method_rules(s: Settings) -> Iterator[Rule]:
    """cdf, training and evaluation: what no method run reads."""
    imported = s.reference_cache.imported
    runs = list(s.methods.values())
    uwo_runs = [r for r in runs if r.objective == "uwo" and r.uwo_lambda == s.cdf.uwo_lambda]
    yield ["cdf.uwo_lambda"], (
        None if s.cdf.objective == "uwo" or uwo_runs
        else f"cdf.objective is {s.cdf.objective!r} (evaluation.uwo_lambdas sets the UWO "
             "curves' weights)")
    yield ["training.ppo"], (None if any(r.is_ppo for r in runs)
                             else "no methods run is trained by PPO (ppo, vbon, bond)")
    schedules = {r.overrides.get("lr_schedule", s.training.ppo.lr_schedule)
                 for r in runs if r.is_ppo}
    yield ["training.ppo.lr_final"], (
        None if schedules - {"constant"}
        else "training.ppo.lr_schedule is 'constant' in every PPO-family run")
    yield ["training.preference"], (
        None if any(not r.is_ppo for r in runs)
        else "no methods run is a preference method (dpo, ipo, bonbon, bon_sft)")
    yield ["evaluation.samples_per_prompt"], (
        "reference_cache.source is 'import' (no policy is evaluated)" if imported else None)


def _prs_only(s: Settings) -> Iterator[Rule]:
    """default_target prs_compare builds the comparison alone: the sections it does not read."""
    c = s.prs_compare
    why = "default_target is 'prs_compare' (only the random-vs-PRS comparison is built)"
    unread = ["generation", "sampling", "reference_cache", "cdf", "training", "evaluation",
              "methods"]
    if c.instructions != "prompts-test":
        unread += ["corpus", "prompts"]
    if c.model != "sft" and c.scorer != "proxy":
        unread += ["policy", "sft"]
    if c.scorer != "proxy":
        unread += ["reward_models", "preferences"]
    for section in unread:
        yield [section], why


def inert_keys(raw: Mapping[str, Any], settings: Settings | Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(key, reason)`` for every key set in ``raw`` (the config as written, before defaults)
    that nothing reads given ``settings`` (the same config, parsed), in config order."""
    s = Settings.from_config(settings)
    out: dict[str, str] = {}
    rules = [*(_prs_only(s) if s.default_target == "prs_compare" else ()), *_rules(raw, s)]
    for keys, reason in rules:
        if reason is None:
            continue
        for key in keys:
            if _is_set(raw, key) and key not in out:
                out[key] = reason
    return list(out.items())


def describe_inert(items: list[tuple[str, str]]) -> list[str]:
    """One warning line per inert key."""
    return [f"config key {key} has no effect: {reason}" for key, reason in items]
