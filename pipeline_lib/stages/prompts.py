"""Stage ``prompts``: corpus or dataset rows -> train/test split -> prompts and SFT rows."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

from pipeline_lib.io.atomic import PathLike
from pipeline_lib.io.corpus import (
    CorpusError,
    check_sft_targets,
    load_task_data,
    prompt_tables,
    sft_target_problem,
)
from pipeline_lib.io.tables import write_table
from pipeline_lib.models.loading import load_tokenizer
from pipeline_lib.settings.sections import Settings
from pipeline_lib.stages.common import provenance

log = logging.getLogger("pipeline")


def run_prompts(
    config: Settings | Mapping[str, Any], prompts_out: Mapping[str, PathLike], corpus_out: Mapping[str, PathLike]
) -> None:
    """Read the ``corpus`` rows, split them train/test, draw the train / test / pref prompts and
    write the corpus tables SFT trains on."""
    s = Settings.from_config(config)
    if s.sft.enabled and (problem := sft_target_problem(s.corpus)):
        raise CorpusError(problem)
    data = load_task_data(s.corpus, s.prompts.test_fraction, s.seed)
    log.info("corpus %s: %d train / %d test rows (split by %s), format %s", data.source,
             data.train.height, data.test.height, data.split_by, s.corpus.format)
    if s.sft.enabled:
        check_sft_targets(s.corpus, data.train, data.source)
    tokenizer = None
    if s.corpus.format == "text_prefix" and s.prompts.prefix_unit == "tokens":
        tokenizer = load_tokenizer(s.policy.ref)  # prefixes of 2-8 tokens, as in the vBoN paper
    pc = s.prompts if s.reward_models.seeds else dataclasses.replace(s.prompts, n_pref=0)
    tables = prompt_tables(data, s.corpus.format, pc, s.seed, tokenizer)
    prov = provenance(s, "prompts", corpus=data.source)
    for split, path in prompts_out.items():
        write_table(tables[split], path, "prompts", prov)
    for split, frame in (("train", data.train), ("test", data.test)):
        write_table(frame, corpus_out[split], "corpus", prov)
