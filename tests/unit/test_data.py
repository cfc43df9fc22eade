import json

import polars as pl
import pytest

from pipeline_lib.io.corpus import (
    CorpusError,
    builtin_corpus_path,
    load_corpus,
    make_prompts,
    split_by_group,
)
from pipeline_lib.settings.sections import CorpusSettings

CFG = {"format": "text_prefix", "source": "rotten_tomatoes", "path": None, "dataset": None,
       "dataset_config": None, "data_files": None, "revision": None, "split": "train",
       "test_split": None, "text_column": "text", "group_column": "movie",
       "prompt_column": "prompt", "target_column": None, "template": None,
       "chosen_column": "chosen", "messages_column": "messages", "filter": None, "min_words": 2}


def corpus_settings(**changes) -> CorpusSettings:
    """The ``corpus`` section of the tests, with ``changes``."""
    return CorpusSettings(**{**CFG, **changes})


def write_corpus(tmp_path, fmt="csv", n_groups=6, per_group=5):
    rows = [{"text": f"review {g} number {i} was a fine film", "movie": f"m{g}"}
            for g in range(n_groups) for i in range(per_group)]
    df = pl.DataFrame(rows)
    path = tmp_path / f"corpus.{fmt}"
    if fmt == "csv":
        df.write_csv(path)
    elif fmt == "parquet":
        df.write_parquet(path)
    else:
        path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_local_corpus_formats(tmp_path, fmt):
    path = write_corpus(tmp_path, fmt)
    corpus, source = load_corpus(corpus_settings(**{"path": str(path)}))
    assert source == str(path)
    assert corpus.columns == ["text_id", "group", "text", "prompt"]
    assert corpus["prompt"].null_count() == corpus.height  # text_prefix: SFT on the whole text
    assert corpus.height == 30


def test_missing_column_names_file_and_key(tmp_path):
    path = write_corpus(tmp_path)
    with pytest.raises(CorpusError, match=r"corpus.csv: column 'body' \(config key corpus.text_column\)"):
        load_corpus(corpus_settings(**{"path": str(path), "text_column": "body"}))
    with pytest.raises(CorpusError, match="corpus.group_column"):
        load_corpus(corpus_settings(**{"path": str(path), "group_column": "film"}))
    with pytest.raises(CorpusError, match="filter column 'category'"):
        load_corpus(corpus_settings(path=str(path), filter={"category": ["fresh"]}))


def test_missing_file_and_empty_corpus(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        load_corpus(corpus_settings(**{"path": str(tmp_path / "nope.csv")}))
    path = write_corpus(tmp_path)
    with pytest.raises(CorpusError, match="no usable texts"):
        load_corpus(corpus_settings(**{"path": str(path), "min_words": 100}))


def test_split_by_group_is_disjoint_and_seeded(tmp_path):
    corpus, _ = load_corpus(corpus_settings(**{"path": str(write_corpus(tmp_path, n_groups=10))}))
    train, test = split_by_group(corpus, 0.3, seed=0)
    assert set(train["group"]).isdisjoint(set(test["group"]))
    assert test["group"].n_unique() == 3 and train.height + test.height == corpus.height
    train2, _ = split_by_group(corpus, 0.3, seed=0)
    assert train.equals(train2)


def test_make_prompts_lengths_and_errors(tmp_path):
    corpus, _ = load_corpus(corpus_settings(**{"path": str(write_corpus(tmp_path))}))
    p = make_prompts(corpus, 12, "train", min_words=2, max_words=4, seed=1)
    assert p["prompt_id"].to_list()[:2] == ["train-00000", "train-00001"]
    assert p["n_words"].min() >= 2 and p["n_words"].max() <= 4
    assert p["text_id"].n_unique() == 12
    for prompt, tid in zip(p["prompt"], p["text_id"], strict=True):
        text = corpus.filter(pl.col("text_id") == tid)["text"][0]
        assert text.startswith(prompt)
    q = make_prompts(corpus, 5, "pref", 2, 4, seed=1, exclude_text_ids=p["text_id"].to_list())
    assert set(q["text_id"]).isdisjoint(set(p["text_id"]))
    with pytest.raises(CorpusError, match=r"fewer than the 31 prompts requested \(config key prompts.n_train\)"):
        make_prompts(corpus, 31, "train", 2, 4, seed=1)


def test_builtin_rotten_tomatoes_corpus():
    path = builtin_corpus_path("rotten_tomatoes")
    assert path.name == "rotten_tomatoes_corpus_full.csv.bz2"
    corpus, _ = load_corpus(corpus_settings(group_column="movie_name", min_words=4,
                                            filter={"category": ["fresh", "rotten"]}))
    assert 12000 < corpus.height < 12900  # 12,808 review snippets minus very short ones
    train, test = split_by_group(corpus, 0.2, seed=0)
    assert set(train["group"]).isdisjoint(set(test["group"]))
