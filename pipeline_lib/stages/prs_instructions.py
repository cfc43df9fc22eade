"""Stage ``prs_instructions``: the instructions of the random-vs-PRS comparison."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from pipeline_lib.io.atomic import atomic_file
from pipeline_lib.io.corpus import read_text_table
from pipeline_lib.io.tables import read_polars, write_table
from pipeline_lib.math.seeding import derive_seed
from pipeline_lib.settings.sections import Settings
from pipeline_lib.stages.common import PathLike, StageError, provenance


def chatterbot_conversations() -> list[tuple[str, list[str]]]:
    """(category, lines) of every English conversation shipped in chatterbot-corpus."""
    import importlib.metadata as md

    import yaml

    try:
        dist = md.distribution("chatterbot-corpus")
    except md.PackageNotFoundError as exc:
        raise StageError("the chatterbot conversations need the chatterbot-corpus wheel: "
                         "pip install --no-deps chatterbot-corpus") from exc
    files = sorted(str(f) for f in dist.files or []
                   if str(f).startswith("chatterbot_corpus/data/english/")
                   and str(f).endswith(".yml"))
    out = []
    for rel in files:
        data = yaml.safe_load(Path(str(dist.locate_file(rel))).read_text(encoding="utf-8"))
        for conv in (data or {}).get("conversations", []) or []:
            if conv and all(isinstance(line, str) for line in conv):
                out.append((Path(rel).stem, [line.strip() for line in conv]))
    return out


def chatterbot_instructions() -> list[str]:
    """Opening lines (of 3 words or more) of the English chatterbot-corpus conversations."""
    out = [lines[0] for _, lines in chatterbot_conversations() if len(lines[0].split()) >= 3]
    return list(dict.fromkeys(out))  # dedupe, keep order


def run_chatterbot_dataset(out: PathLike) -> None:
    """The chatterbot-corpus conversations as a JSONL dataset in the ``messages`` format (one
    row per opener with its reply: ``messages`` [user, assistant], ``category`` the topic
    file), for ``corpus.format: messages`` (config/chat.yaml)."""
    rows, seen = [], set()
    for category, lines in chatterbot_conversations():
        if len(lines) < 2 or len(lines[0].split()) < 3 or lines[0] in seen:
            continue
        seen.add(lines[0])
        rows.append({"category": category,
                     "messages": [{"role": "user", "content": lines[0]},
                                  {"role": "assistant", "content": lines[1]}]})
    with atomic_file(out) as tmp:
        pl.DataFrame(rows).write_ndjson(tmp)


def dataset_instructions(s: Settings) -> list[str]:
    """The non-empty ``prs_compare.instruction_data.column`` values of its dataset split."""
    from pipeline_lib.io.datasets import DatasetSourceError, load_split

    d = s.prs_compare.instruction_data
    cfg = dataclasses.replace(s.corpus, dataset=d.dataset, dataset_config=d.dataset_config,
                              data_files=d.data_files, revision=d.revision, split=d.split)
    key = "prs_compare.instruction_data"
    try:
        ds = load_split(cfg, d.split, f"{key}.split")
    except DatasetSourceError as exc:  # its messages name the corpus keys it was given
        raise StageError(str(exc).replace("config key corpus.", f"config key {key}.")) from None
    if d.column not in ds.column_names:
        raise StageError(f"{d.dataset}: no column {d.column!r} (config key {key}.column); "
                         f"columns are {ds.column_names}")
    return [str(t) for t in ds[d.column] if t]


def run_prs_instructions(config: Settings | Mapping[str, Any], out: PathLike,
                         prompts_test: PathLike | None = None) -> None:
    """The comparison's instructions as a prompts table (split 'prs', preference z)."""
    s = Settings.from_config(config)

    c = s.prs_compare
    source = c.instructions
    if source == "prompts-test":
        texts = read_polars(prompts_test, "prompts")["prompt"].to_list()
    elif source == "chatterbot":
        texts = chatterbot_instructions()
    elif source == "dataset":
        texts = dataset_instructions(s)
    else:
        frame = read_text_table(source)
        if "instruction" not in frame.columns:
            raise StageError(f"{source}: no 'instruction' column (config key "
                             f"prs_compare.instructions); columns are {frame.columns}")
        texts = [t for t in frame["instruction"].cast(pl.String).to_list() if t]
    if len(texts) < c.n_prompts:
        raise StageError(f"prs_compare.instructions {source!r}: {len(texts)} instructions, "
                         f"fewer than prs_compare.n_prompts = {c.n_prompts}")
    rng = np.random.default_rng(derive_seed(s.seed, "prs-instructions"))
    chosen = [texts[i] for i in np.sort(rng.choice(len(texts), c.n_prompts, replace=False))]
    z = c.preference or s.prs.preference
    n = len(chosen)
    frame = pl.DataFrame({
        "prompt_id": [f"prs-{i:05d}" for i in range(n)], "split": ["prs"] * n,
        "prompt": chosen, "text_id": [f"i{i}" for i in range(n)], "group": [source] * n,
        "n_words": [len(t.split()) for t in chosen], "preference": [z] * n,
    }, schema_overrides={"preference": pl.String, "n_words": pl.Int32})
    write_table(frame, out, "prompts", provenance(s, "prs_instructions", source=source))
