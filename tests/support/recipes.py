"""Tiny stand-ins for the models and datasets the recipes (config/recipes/*.yaml) name, placed
under the recipes' own hub ids, so a recipe runs end to end offline with its model and dataset
keys untouched; only sizes change, through its override file (tests/data/recipe-overrides/).

:func:`build_recipe_hub` writes one hub-layout cache (models and datasets) and returns a
:class:`~tests.support.tiny_hub.TinyHub` whose ``env()`` points a subprocess at it;
:func:`place_local_models` puts the models a recipe names by local path (e.g. the AlpacaFarm
gold reward model, which users make from a weight diff) into a run's working directory.

Which tiny model stands in for which id (:data:`MODEL_STAND_INS`), and which tiny rows for each
dataset (:data:`DATASET_STAND_INS`), is declared here; :func:`named_models` lists what a recipe
names, so a recipe that names a model without a stand-in fails the tests with its name.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline_lib.models.hub import add_to_cache
from pipeline_lib.settings.config import looks_like_path
from pipeline_lib.settings.sections import Settings
from support import tiny_data
from support.tiny_hub import BUILDERS, TinyHub, fake_commit, save_tiny, tiny_pythia

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ("vbon-imdb", "vbon-tldr", "ensembles-alpacafarm", "bonbon-hh", "prs-alpacaeval")


def recipe_path(name: str) -> Path:
    return ROOT / "config" / "recipes" / f"{name}.yaml"


def override_path(name: str) -> Path:
    return ROOT / "tests" / "data" / "recipe-overrides" / f"{name}.yaml"


# hub id or local path -> the tiny model standing in for it (tiny_hub.BUILDERS' short names;
# "pythia-reward": a one-logit GPTNeoX sequence classifier; "pythia-8": 8 layers)
MODEL_STAND_INS = {
    "lvwerra/gpt2-imdb": "gpt2",
    "lvwerra/distilbert-imdb": "distilbert",
    "cleanrl/EleutherAI_pythia-2.8b-deduped__sft__tldr": "pythia-8",  # top 8 layers train
    "cleanrl/EleutherAI_pythia-2.8b-deduped__reward__tldr": "pythia-reward",
    "tlc4418/pythia_1.4b_sft_policy": "pythia",
    "tlc4418/pythia_70m_sft": "pythia",
    "./models/alpacafarm-reward-model-human": "deberta",
    "EleutherAI/pythia-2.8b": "pythia",
    "OpenAssistant/reward-model-deberta-v3-large-v2": "deberta",
    "mistralai/Mistral-7B-Instruct-v0.2": "llama",
}

_TLDR = "SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR:"


def _tldr_rows(n: int, split: str) -> list[dict[str, Any]]:
    """CarperAI/openai_summarize_tldr's columns: the formatted ``prompt`` and the ``label``."""
    return [{"prompt": _TLDR.format(**r), "label": " " + r["summary"]}
            for r in tiny_data.tldr_rows(n, 0, split)]


def _alpaca_eval_files() -> dict[str, str]:
    """tatsu-lab/alpaca_eval's layout: its JSON and a loading script (which must not run)."""
    rows = [{"instruction": r["instruction"] + (f" {r['input']}" if r["input"] else ""),
             "output": r["output"], "generator": "tiny", "dataset": "tiny"}
            for r in tiny_data.alpaca_rows(40, 0, "eval")]
    return {"alpaca_eval.json": json.dumps(rows),
            "alpaca_eval.py": "raise RuntimeError('a dataset loading script was run')\n"}


# dataset id -> (config name or None, {split: rows}) or the files of the repository
DATASET_STAND_INS = {
    "stanfordnlp/imdb": (None, lambda: {"train": tiny_data.imdb_rows(120, 0, "train"),
                                        "test": tiny_data.imdb_rows(40, 0, "test")}),
    "CarperAI/openai_summarize_tldr": (None, lambda: {"train": _tldr_rows(120, "train"),
                                                      "valid": _tldr_rows(40, "valid"),
                                                      "test": _tldr_rows(40, "test")}),
    "tatsu-lab/alpaca_farm": ("alpaca_instructions", lambda: {
        "unlabeled": tiny_data.alpaca_rows(160, 0, "unlabeled"),
        "val": tiny_data.alpaca_rows(40, 0, "val")}),
    "Anthropic/hh-rlhf": (None, lambda: {"train": tiny_data.hh_rows(120, 0, "train"),
                                         "test": tiny_data.hh_rows(40, 0, "test")}),
    "tatsu-lab/alpaca_eval": ("files", _alpaca_eval_files),
}


def named_models(s: Settings) -> set[str]:
    """Every model name the parsed recipe ``s`` uses."""
    names = set()
    if s.default_target != "prs_compare" or s.prs_compare.model == "sft":
        names.add(s.policy.base)
    if s.gold.type == "hf":
        names.add(s.gold.model)
    rm = s.reward_models
    if rm.seeds and rm.base != "sft":
        names.add(rm.base)
    names.update(p.model for p in rm.pretrained)
    if s.prs_compare.enabled and s.prs_compare.model not in ("sft", "smollm2"):
        names.add(s.prs_compare.model)
    return names - {"scratch"}


def named_datasets(s: Settings) -> set[str]:
    out = {s.corpus.dataset} if s.default_target != "prs_compare" else set()
    if s.prs_compare.enabled and s.prs_compare.instructions == "dataset":
        out.add(s.prs_compare.instruction_data.dataset)
    return out - {None}


def _pythia_reward():
    from transformers import GPTNeoXForSequenceClassification

    model, tok = tiny_pythia()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        reward = GPTNeoXForSequenceClassification.from_pretrained(tmp, num_labels=1)
    reward.config.pad_token_id = tok.pad_token_id
    return reward, tok


def _save_stand_in(kind: str, path: Path) -> Path:
    if kind == "pythia-reward":
        return save_tiny(*_pythia_reward(), path, "GPTNeoXTokenizer")
    if kind == "pythia-8":
        return save_tiny(*tiny_pythia(n_layer=8), path, "GPTNeoXTokenizer")
    build, tokenizer_class = BUILDERS[kind]
    return save_tiny(*build(), path, tokenizer_class)


def build_recipe_hub(home: str | Path) -> TinyHub:
    """Every hub model and dataset of :data:`MODEL_STAND_INS` / :data:`DATASET_STAND_INS` in the
    hub cache ``home/hub``; local-path stand-ins are saved under ``home/local/<kind>``."""
    home = Path(home)
    cache = home / "hub"
    commits: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        built: dict[str, Path] = {}
        for name, kind in MODEL_STAND_INS.items():
            if kind not in built:
                built[kind] = _save_stand_in(kind, Path(tmp) / kind)
            if looks_like_path(name):
                dst = home / "local" / kind
                if not dst.exists():
                    shutil.copytree(built[kind], dst)
                continue
            commit = add_to_cache(cache, name, built[kind], ("main",), fake_commit(name, "main"))
            commits[name] = {"main": commit}
    for repo_id, (config_name, rows) in DATASET_STAND_INS.items():
        if config_name == "files":
            tiny_data.write_hub_files(cache, repo_id, rows())
        else:
            tiny_data.write_hub_dataset(cache, repo_id, rows(), config_name=config_name)
    return TinyHub(home=home, cache=cache, ids={}, commits=commits)


def place_local_models(hub: TinyHub, workdir: Path) -> None:
    """Copy the stand-ins of the models named by a relative path into ``workdir``."""
    for name, kind in MODEL_STAND_INS.items():
        if looks_like_path(name) and not Path(name).is_absolute():
            dst = workdir / name
            if not dst.exists():
                shutil.copytree(hub.home / "local" / kind, dst)


def leaf_keys(config: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys of every leaf of a nested mapping (a list is a leaf)."""
    out = []
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out += leaf_keys(value, dotted + ".")
        else:
            out.append(dotted)
    return out


# What a recipe's override file may change to run on the stand-ins: sizes, lengths, step
# counts and batch sizes, never a model, dataset, method, objective or hyperparameter.
SIZE_KEYS = {
    "threads", "device",
    "prompts.n_train", "prompts.n_test", "prompts.n_pref",
    "sampling.shards", "sampling.M.train", "sampling.M.test",
    "generation.max_new_tokens", "generation.batch_size",
    "sft.epochs", "sft.max_steps", "sft.batch_size", "sft.max_length", "sft.warmup_steps",
    "sft.checkpoint_every", "sft.eval_every", "sft.log_every",
    "reward_models.epochs", "reward_models.batch_size", "reward_models.max_length",
    "reward_models.warmup_steps", "gold.max_length", "scoring.batch_size",
    "training.ppo.steps", "training.ppo.rollout_batch_size", "training.ppo.minibatch_size",
    "training.ppo.checkpoint_every",
    "training.preference.epochs", "training.preference.max_steps",
    "training.preference.batch_size", "training.preference.warmup_steps",
    "training.preference.checkpoint_every",
    "evaluation.samples_per_prompt", "evaluation.bon_ns",
    "prs.feedback_max_new_tokens",
    "prs_compare.n_prompts", "prs_compare.ns", "prs_compare.max_new_tokens",
    "prs_compare.batch_size",
}
