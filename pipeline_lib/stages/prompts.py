"""Stage ``prompts``: corpus -> group-wise train/test split -> prompts."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from pipeline_lib.io.atomic import PathLike
from pipeline_lib.io.corpus import load_corpus, make_prompts, split_by_group
from pipeline_lib.io.tables import write_table
from pipeline_lib.settings.sections import Settings
from pipeline_lib.stages.common import provenance

log = logging.getLogger("pipeline")


def run_prompts(
    config: Settings | Mapping[str, Any], prompts_out: Mapping[str, PathLike], corpus_out: Mapping[str, PathLike]
) -> None:
    """Load the corpus, split it by group, cut prompts for the train / test / pref splits."""
    s = Settings.from_config(config)
    corpus, source = load_corpus(s.corpus)
    train, test = split_by_group(corpus, s.prompts.test_fraction, s.seed)
    log.info("corpus %s: %d texts, %d train / %d test (split by group)", source,
             corpus.height, train.height, test.height)
    pc, seed = s.prompts, s.seed
    kw = dict(min_words=pc.min_words, max_words=pc.max_words, seed=seed,
              preference=pc.preference)
    tables = {
        "train": make_prompts(train, pc.n_train, "train", **kw),
        "test": make_prompts(test, pc.n_test, "test", **kw),
    }
    tables["pref"] = make_prompts(train, pc.n_pref, "pref",
                                  exclude_text_ids=tables["train"]["text_id"].to_list(), **kw)
    prov = provenance(s, "prompts", corpus=source)
    for split, path in prompts_out.items():
        write_table(tables[split], path, "prompts", prov)
    for split, frame in (("train", train), ("test", test)):
        write_table(frame, corpus_out[split], "corpus", prov)
