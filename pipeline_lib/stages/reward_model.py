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
    load_tokenizer,
    save_model,
)
from pipeline_lib.settings.sections import Settings
from pipeline_lib.stages.common import (
    dispatch_training_job,
    is_main_process,
    launch_info,
    provenance,
    remove_checkpoint,
    setup_job,
    training_checkpoint,
)
from pipeline_lib.train.reward_model import train_reward_model

log = logging.getLogger("pipeline")


def run_reward_model(
    config: Settings | Mapping[str, Any], seed: int, preferences: PathLike, policy_dir: PathLike,
    out_dir: PathLike, log_table: PathLike, checkpoint_dir: PathLike | None = None,
    threads: int | None = None,
) -> None:
    """Train one ensemble member: a one-logit classifier initialised from the SFT policy (in
    one process, or several: ``training.launch``). With ``checkpoint_dir``, a killed job
    resumes from its last checkpoint (``reward_models.checkpoint_every``)."""
    s = Settings.from_config(config)
    ckpt = training_checkpoint(s, checkpoint_dir, ("reward_models",),
                               [preferences, policy_dir], rm_seed=int(seed))
    dispatch_training_job("reward_model", reward_model_job, s, threads,
                          ckpt or Path(out_dir).parent, seed=int(seed),
                          preferences=str(preferences), policy_dir=str(policy_dir),
                          out_dir=str(out_dir), log_table=str(log_table),
                          checkpoint_dir=ckpt and str(ckpt))
    remove_checkpoint(ckpt)


def reward_model_job(
    config: Settings | Mapping[str, Any], seed: int, preferences: PathLike, policy_dir: PathLike,
    out_dir: PathLike, log_table: PathLike, checkpoint_dir: PathLike | None = None,
    threads: int | None = None,
) -> None:
    """The training of :func:`run_reward_model` (every rank); the main process writes."""
    from transformers import AutoModelForSequenceClassification

    s = Settings.from_config(config)
    setup_job(s, threads, "reward-model", seed)
    pairs = read_polars(preferences, "preferences")
    tokenizer = load_tokenizer(policy_dir, "policy")
    torch.manual_seed(derive_seed(seed, "rm-head"))  # the seed picks the head initialisation
    model = AutoModelForSequenceClassification.from_pretrained(
        policy_dir, num_labels=1, local_files_only=True, trust_remote_code=False
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    texts_w = [p + r for p, r in zip(pairs["prompt"], pairs["chosen"], strict=True)]
    texts_l = [p + r for p, r in zip(pairs["prompt"], pairs["rejected"], strict=True)]
    rows, model = train_reward_model(model, tokenizer, texts_w, texts_l, s.reward_models, s.device,
                                     seed=derive_seed(seed, "rm-order"),
                                     checkpoint_dir=checkpoint_dir)
    if not is_main_process():
        return
    for r in rows:
        log.info("rm seed %d %s", seed, json.dumps(r))
    with atomic_dir(out_dir) as tmp:
        save_model(model, tokenizer, tmp)
    write_table(pl.DataFrame(rows), log_table, "train_log",
                provenance(s, "reward_model", rm_seed=seed, init=policy_dir,
                           **launch_info(s)))
