"""Stage ``reward_model``: one seed of the proxy reward-model ensemble."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import polars as pl
import torch

from pipeline_lib.io.atomic import PathLike, atomic_dir
from pipeline_lib.io.tables import read_polars, write_table
from pipeline_lib.math.seeding import derive_seed
from pipeline_lib.models.loading import (
    load_sequence_classifier,
    load_tokenizer,
    save_model,
)
from pipeline_lib.settings.sections import ModelRef, Settings
from pipeline_lib.stages.common import (
    dispatch_training_job,
    is_main_process,
    launch_info,
    provenance,
    remove_checkpoint,
    setup_job,
    training_checkpoint,
)
from pipeline_lib.stages.generate import load_policy_tokenizer, policy_source
from pipeline_lib.train.reward_model import train_reward_model

log = logging.getLogger("pipeline")


def run_reward_model(
    config: Settings | Mapping[str, Any], seed: int, preferences: PathLike,
    policy_dir: PathLike | None, out_dir: PathLike, log_table: PathLike,
    checkpoint_dir: PathLike | None = None, threads: int | None = None,
) -> None:
    """Train one ensemble member: a one-logit classifier initialised from ``reward_models.base``
    (the SFT policy in ``policy_dir`` for ``sft``, π_ref by name when SFT is off, or another
    model by hub id or directory), in one process or several (``training.launch``). With
    ``checkpoint_dir``, a killed job resumes from its last checkpoint
    (``reward_models.checkpoint_every``)."""
    s = Settings.from_config(config)
    from_policy = s.reward_models.base_ref is None
    ckpt = training_checkpoint(s, checkpoint_dir, ("reward_models",),
                               [preferences, policy_dir], rm_seed=int(seed),
                               init=str(init_source(s, policy_dir)),
                               policy=s.source.get("policy") if from_policy else None)
    dispatch_training_job("reward_model", reward_model_job, s, threads,
                          ckpt or Path(out_dir).parent, seed=int(seed),
                          preferences=str(preferences),
                          policy_dir=None if policy_dir is None else str(policy_dir),
                          out_dir=str(out_dir), log_table=str(log_table),
                          checkpoint_dir=ckpt and str(ckpt))
    remove_checkpoint(ckpt)


def init_source(s: Settings, policy_dir: PathLike | None) -> PathLike | ModelRef:
    """What a trained seed starts from: ``reward_models.base`` by name, or (``base: sft``) the
    SFT policy's directory (π_ref by name, ``policy.base``, when SFT is off)."""
    ref = s.reward_models.base_ref
    return ref if ref is not None else policy_source(s, policy_dir)


def load_reward_model_init(s: Settings, policy_dir: PathLike | None):
    """(tokenizer, one-logit classifier on the CPU) that a seed starts from (seed torch first:
    the head is initialised here). A policy's tokenizer gets ``policy.chat_template`` as every
    stage applies it; another base keeps its own."""
    ref = s.reward_models.base_ref
    if ref is not None:
        source, key = ref, ref.key
        tokenizer = load_tokenizer(ref, key)
    else:
        source, key = policy_source(s, policy_dir), "policy"
        tokenizer = load_policy_tokenizer(s, source)
    model = load_sequence_classifier(source, "cpu", key, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model


def reward_model_job(
    config: Settings | Mapping[str, Any], seed: int, preferences: PathLike,
    policy_dir: PathLike | None, out_dir: PathLike, log_table: PathLike,
    checkpoint_dir: PathLike | None = None, threads: int | None = None,
) -> None:
    """The training of :func:`run_reward_model` (every rank); the main process writes the
    model with its tokenizer (so scoring reads pairs exactly as training did)."""
    s = Settings.from_config(config)
    setup_job(s, threads, "reward-model", seed)
    pairs = read_polars(preferences, "preferences")
    torch.manual_seed(derive_seed(seed, "rm-head"))  # the seed picks the head initialisation
    tokenizer, model = load_reward_model_init(s, policy_dir)
    rows, model = train_reward_model(model, tokenizer, pairs["chosen"].to_list(),
                                     pairs["rejected"].to_list(), s.reward_models, s.device,
                                     seed=derive_seed(seed, "rm-order"),
                                     checkpoint_dir=checkpoint_dir,
                                     prompts=pairs["prompt"].to_list())
    if not is_main_process():
        return
    for r in rows:
        log.info("rm seed %d %s", seed, json.dumps(r))
    with atomic_dir(out_dir) as tmp:
        save_model(model, tokenizer, tmp)
    write_table(pl.DataFrame(rows), log_table, "train_log",
                provenance(s, "reward_model", rm_seed=seed,
                           init=str(init_source(s, policy_dir)),
                           input=s.reward_models.input, template=s.reward_models.template,
                           max_length=s.reward_models.max_length, **launch_info(s)))
