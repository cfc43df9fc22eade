"""Stage ``sft``: the reference policy, trained from scratch or fine-tuned from a base model."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import polars as pl

from pipeline_lib.io.atomic import PathLike, atomic_dir
from pipeline_lib.io.corpus import read_corpus
from pipeline_lib.io.tables import write_table
from pipeline_lib.math.seeding import derive_seed
from pipeline_lib.models.loading import (
    build_scratch_policy,
    save_model,
    train_tokenizer,
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
from pipeline_lib.stages.generate import load_policy
from pipeline_lib.train.sft import train_sft

log = logging.getLogger("pipeline")


def run_sft(
    config: Settings | Mapping[str, Any],
    corpus_train: PathLike,
    corpus_test: PathLike,
    out_dir: PathLike,
    log_table: PathLike,
    checkpoint_dir: PathLike | None = None,
    threads: int | None = None,
) -> None:
    """Train the reference policy: from scratch (BPE tokenizer + GPT-2) or from a local model
    (in one process, or several: ``training.launch``). With ``checkpoint_dir``, a killed job
    resumes from its last checkpoint (``sft.checkpoint_every``)."""
    s = Settings.from_config(config)
    base = s.policy.base
    ckpt = training_checkpoint(s, checkpoint_dir, ("policy", "sft"),
                               [corpus_train, corpus_test, base if Path(base).is_dir() else None])
    dispatch_training_job("sft", sft_job, s, threads, ckpt or Path(out_dir).parent,
                          corpus_train=str(corpus_train), corpus_test=str(corpus_test),
                          out_dir=str(out_dir), log_table=str(log_table),
                          checkpoint_dir=ckpt and str(ckpt))
    remove_checkpoint(ckpt)


def sft_job(
    config: Settings | Mapping[str, Any],
    corpus_train: PathLike,
    corpus_test: PathLike,
    out_dir: PathLike,
    log_table: PathLike,
    checkpoint_dir: PathLike | None = None,
    threads: int | None = None,
) -> None:
    """The training of :func:`run_sft` (every rank of a launch); the main process writes."""
    s = Settings.from_config(config)
    setup_job(s, threads, "sft")
    # A row with a prompt is a (prompt, target) pair trained on its target only; a row
    # without one (format text_prefix) is a text trained on whole.
    train_rows, val_rows = read_corpus(corpus_train), read_corpus(corpus_test).head(512)
    train_texts, train_prompts = train_rows["text"].to_list(), train_rows["prompt"].to_list()
    val_texts, val_prompts = val_rows["text"].to_list(), val_rows["prompt"].to_list()
    pol = s.policy
    if pol.base == "scratch":
        # Under a launch every rank trains it: BPE training is deterministic (the same
        # vocabulary in separate processes and with any thread count, checked on the default
        # corpus), so all ranks encode alike.
        tokenizer = train_tokenizer([*(p for p in train_prompts if p is not None), *train_texts],
                                    pol.vocab_size)
        model = build_scratch_policy(tokenizer, n_positions=pol.n_positions, n_embd=pol.n_embd,
                                     n_layer=pol.n_layer, n_head=pol.n_head)
        log.info("scratch GPT-2: %d parameters, vocab %d",
                 sum(p.numel() for p in model.parameters()), len(tokenizer))
    else:
        tokenizer, model = load_policy(s, pol.ref, "cpu")
        model.config.pad_token_id = tokenizer.pad_token_id
    rows, model = train_sft(model, tokenizer, train_texts, val_texts, s.sft, s.device,
                            seed=derive_seed(s.seed, "sft-order"),
                            on_log=lambda r: log.info("sft %s", json.dumps(r)),
                            checkpoint_dir=checkpoint_dir, train_prompts=train_prompts,
                            val_prompts=val_prompts)
    if not is_main_process():
        return
    with atomic_dir(out_dir) as tmp:
        save_model(model, tokenizer, tmp)
    write_table(pl.DataFrame(rows, schema_overrides={"accuracy": pl.Float64}), log_table,
                "train_log", provenance(s, "sft", base=pol.base, **launch_info(s)))

