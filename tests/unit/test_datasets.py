"""Prompts and SFT data through ``datasets``: the row formats (text_prefix, prompt, hh, messages),
every on-disk layout (hub-style Parquet folder, JSONL files, save_to_disk, a hub cache read by id
offline), column and template errors, train/test disjointness, the corpus tables, completion-only
SFT (loss on the target only) and the default task's prompts unchanged."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from support.tiny_data import (
    ALPACA_TEMPLATE,
    TLDR_TEMPLATE,
    alpaca_rows,
    hh_rows,
    imdb_rows,
    messages_rows,
    tiny_dataset,
    tldr_rows,
    write_hub_dataset,
    write_parquet_folder,
)

from pipeline_lib.io.conversation import messages_to_prompt, prompt_messages
from pipeline_lib.io.corpus import (
    corpus_examples,
    load_task_data,
    prompt_tables,
    read_corpus,
    select_prompts,
)
from pipeline_lib.io.datasets import DatasetSourceError, load_split, local_dataset_files
from pipeline_lib.io.formats import (
    CorpusError,
    fill_template,
    hh_example,
    messages_example,
    row_example,
    template_columns,
)
from pipeline_lib.io.tables import read_polars, write_table
from pipeline_lib.models.encoding import encode_prompt
from pipeline_lib.settings.config import load_config
from pipeline_lib.settings.errors import ConfigError
from pipeline_lib.settings.sections import Settings
from pipeline_lib.stages.prompts import run_prompts
from pipeline_lib.train.sft import (
    _lm_loss,
    encode_completion,
    encode_lm_texts,
    encode_sft_examples,
    lm_eval_loss,
)

ROOT = Path(__file__).resolve().parents[2]
TINY_PROMPTS = {"n_train": 8, "n_test": 4, "n_pref": 16}
FORMATS = [("text_prefix", None), ("prompt", None), ("prompt", "alpaca"), ("hh", None),
           ("messages", None)]
LAYOUTS = ["parquet_folder", "jsonl", "saved", "hub"]


def settings(corpus: dict, **sections) -> Settings:
    """The tiny test config with ``corpus`` (and other sections) replaced, validated."""
    overrides = {"corpus": corpus, "prompts": TINY_PROMPTS, **sections}
    return Settings.from_config(load_config(ROOT / "tests/data/tiny.yaml", overrides))


def corpus_cfg(**keys):
    """A corpus section for a polars frame (no source keys needed)."""
    base = {"format": "prompt", "group_column": None, "filter": None}
    # no SFT (a named pi_ref; never loaded here): a prompt column needs no target
    return settings({**base, **keys}, sft={"enabled": False},
                    policy={"base": "tiny-random/gpt2"}).corpus


@pytest.fixture()
def offline_hub(tmp_path, monkeypatch):
    """An empty hub cache, offline (environment and the libraries' constants)."""
    import datasets.config
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    return cache


# ---------------------------------------------------------------------------------------------
# Row formats: pure functions on hand-made rows
# ---------------------------------------------------------------------------------------------
def test_hh_prompt_is_everything_up_to_the_last_assistant_turn():
    conv = ("\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?"
            "\n\nHuman: Tell me a joke\n\nAssistant:   Why did the chicken cross the road?  ")
    prompt, target = hh_example(conv)
    assert prompt == ("\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?"
                      "\n\nHuman: Tell me a joke\n\nAssistant:")
    assert target == "Why did the chicken cross the road?"
    assert prompt_messages(prompt)[-1] == {"role": "user", "content": "Tell me a joke"}
    assert hh_example("\n\nHuman: only a question\n\nAssistant:") == (
        "\n\nHuman: only a question\n\nAssistant:", None)
    # ending with a Human turn: all prompt, no target (as a message list ending with a user turn)
    assert hh_example("\n\nHuman: a\n\nAssistant: b\n\nHuman: c ") == (
        "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:", None)
    with pytest.raises(ValueError, match="no 'Assistant:' turn"):
        hh_example("\n\nHuman: nobody answered")
    with pytest.raises(ValueError, match="transcript string"):
        hh_example(["not", "a", "string"])


def test_messages_prompt_is_every_turn_before_the_last_assistant_turn():
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": " Four. "}]
    prompt, target = messages_example(msgs)
    assert target == "Four."
    assert prompt == messages_to_prompt(msgs[:-1])
    assert prompt == ("System: Be brief.\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: What is 2+2?"
                      "\n\nAssistant:")
    assert prompt_messages(prompt) == msgs[:-1]
    # ending with a user turn: all prompt, no target
    assert messages_example(msgs[:-1]) == (prompt, None)
    # a single user turn is stored as its content
    assert messages_example([{"role": "user", "content": "Hey"},
                             {"role": "assistant", "content": "Yo"}]) == ("Hey", "Yo")
    # no user content at all: no prompt (the row is skipped)
    assert messages_example([{"role": "assistant", "content": "Hi"}]) == (None, "Hi")
    assert messages_example(None) == (None, None)
    with pytest.raises(ValueError, match="role, content"):
        messages_example("Hi")
    with pytest.raises(ValueError, match="role, content"):
        messages_example([{"content": "no role"}])
    with pytest.raises(ValueError, match="unknown role 'tool'"):
        messages_example([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"},
                          {"role": "user", "content": "c"}])


def test_template_slots_are_named_columns_filled_literally():
    row = {"subreddit": "cooking", "title": "Burnt rice", "post": "It always burns.", "x": 1}
    assert fill_template(TLDR_TEMPLATE, row) == (
        "SUBREDDIT: r/cooking\nTITLE: Burnt rice\nPOST: It always burns.\nTL;DR:")
    assert template_columns(TLDR_TEMPLATE) == ["subreddit", "title", "post"]
    # literal: an empty (or null) input leaves the template's own text, nothing removed
    assert fill_template(ALPACA_TEMPLATE, {"instruction": "Add.", "input": "2 and 3"}) == (
        "Add.\n\n2 and 3")
    assert fill_template(ALPACA_TEMPLATE, {"instruction": "Smile.", "input": ""}) == "Smile.\n\n"
    assert fill_template(ALPACA_TEMPLATE, {"instruction": "Smile.", "input": None}) == "Smile.\n\n"
    assert fill_template("{{literal}} {x}", row) == "{literal} 1"
    with pytest.raises(CorpusError, match=r"config key corpus.template: slot \{0\} must name"):
        template_columns("{0} and {title}")
    with pytest.raises(CorpusError, match="config key corpus.template: not a valid template"):
        template_columns("{title")


def test_prompt_format_columns_and_targets():
    cfg = corpus_cfg(prompt_column="question", target_column="answer")
    assert row_example(cfg, {"question": "Why?", "answer": " Because."}) == ("Why?", " Because.")
    assert row_example(cfg, {"question": "Why?", "answer": "   "}) == ("Why?", None)
    assert row_example(cfg, {"question": None, "answer": "x"}) == (None, "x")
    no_target = corpus_cfg(prompt_column="question")
    assert row_example(no_target, {"question": "Why?", "answer": "x"}) == ("Why?", None)


# ---------------------------------------------------------------------------------------------
# Column errors: one line, naming the config key, the source and the available columns
# ---------------------------------------------------------------------------------------------
def test_missing_columns_and_unusable_rows_are_one_line_errors():
    df = pl.DataFrame({"instruction": ["a b", "c d"], "output": ["x", "y"], "topic": ["t", "u"]})
    cases = [
        (dict(prompt_column="prompt"),
         r"^src: column 'prompt' \(config key corpus.prompt_column\) not found; columns are "
         r"\['instruction', 'output', 'topic'\]$"),
        (dict(template="{instruction} {context}"),
         r"template column 'context' \(config key corpus.template\) not found; columns are"),
        (dict(template="{instruction}", target_column="response"),
         r"column 'response' \(config key corpus.target_column\)"),
        (dict(template="{instruction}", group_column="movie"),
         r"column 'movie' \(config key corpus.group_column\)"),
        (dict(template="{instruction}", filter={"lang": ["en"]}),
         r"filter column 'lang' \(config key corpus.filter\)"),
        (dict(format="hh"), r"column 'chosen' \(config key corpus.chosen_column\)"),
        (dict(format="messages", messages_column="conversation"),
         r"column 'conversation' \(config key corpus.messages_column\)"),
        (dict(format="text_prefix"), r"column 'text' \(config key corpus.text_column\)"),
    ]
    for keys, pattern in cases:
        with pytest.raises(CorpusError, match=pattern) as err:
            corpus_examples(df, corpus_cfg(**keys), "src")
        assert "\n" not in str(err.value)
    bad = pl.DataFrame({"chosen": ["\n\nHuman: hi\n\nAssistant: yo", "no turns here"]})
    with pytest.raises(CorpusError, match=r"^src: row 1 .* not usable as format 'hh' \(columns "
                                          r"\['chosen'\]\): no 'Assistant:' turn"):
        corpus_examples(bad, corpus_cfg(format="hh"), "src")
    bad = pl.DataFrame({"messages": ["a plain string"]})
    with pytest.raises(CorpusError, match="not usable as format 'messages'"):
        corpus_examples(bad, corpus_cfg(format="messages"), "src")


def test_dataset_errors_name_the_key_and_the_dataset(tmp_path, offline_hub):
    folder = write_parquet_folder(tmp_path / "folder", {"train": imdb_rows(10),
                                                        "test": imdb_rows(4, split="test")})
    cfg = settings({"dataset": str(folder), "format": "text_prefix", "group_column": None,
                    "filter": None, "test_split": "validation"}).corpus
    with pytest.raises(DatasetSourceError, match=r"split 'validation'\): config key "
                                                 r"corpus.test_split: Unknown split"):
        load_split(cfg, "validation", "corpus.test_split")
    with pytest.raises(CorpusError, match=r"column 'review' \(config key corpus.text_column\) "
                                          r"not found; columns are \['text', 'label'\]"):
        load_task_data(settings({"dataset": str(folder), "format": "text_prefix",
                                 "text_column": "review", "group_column": None,
                                 "filter": None}).corpus, 0.2, 0)
    missing = settings({"dataset": "nobody/nothing", "group_column": None,
                        "filter": None}).corpus
    with pytest.raises(DatasetSourceError) as err:
        load_split(missing, "train")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("config key corpus.dataset: 'nobody/nothing' is not "
                                             "a local folder, nor a hub dataset in the Hugging "
                                             "Face cache")
    assert "hf download nobody/nothing --repo-type dataset" in msg
    with pytest.raises(DatasetSourceError, match="config key corpus.dataset: not found"):
        load_split(settings({"dataset": "json", "data_files": str(tmp_path / "nope.jsonl"),
                             "group_column": None, "filter": None}).corpus, "train")
    with pytest.raises(CorpusError, match="config key corpus.test_split .* corpus.dataset, "
                                          "which is null"):
        load_task_data(settings({"test_split": "test"}).corpus, 0.2, 0)


# ---------------------------------------------------------------------------------------------
# Every format in every layout, through datasets: the expected prompts and targets
# ---------------------------------------------------------------------------------------------
def expected_pairs(fmt: str, variant: str | None, rows: list[dict]) -> set[tuple]:
    """(prompt, target) of each row, written out independently of the library's formats."""
    out = set()
    for r in rows:
        if fmt == "text_prefix":
            out.add((None, r["text"].strip()))
        elif variant == "alpaca":
            out.add((f"{r['instruction']}\n\n{r['input']}", r["output"]))
        elif fmt == "prompt":
            out.add((f"SUBREDDIT: r/{r['subreddit']}\nTITLE: {r['title']}\nPOST: {r['post']}"
                     "\nTL;DR:", r["summary"]))
        elif fmt == "hh":
            cut = r["chosen"].rindex("Assistant:") + len("Assistant:")
            out.add((r["chosen"][:cut], r["chosen"][cut:].strip()))
        else:
            msgs = r["messages"]
            if msgs[-1]["role"] == "assistant":
                out.add((messages_to_prompt(msgs[:-1]), msgs[-1]["content"]))
            else:
                out.add((messages_to_prompt(msgs), ""))
    return out


def pairs(frame: pl.DataFrame) -> set[tuple]:
    return set(zip(frame["prompt"].to_list(), frame["text"].to_list(), strict=True))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("fmt", "variant"), FORMATS)
def test_each_format_in_each_layout(tmp_path, offline_hub, fmt, variant, layout):
    data = tiny_dataset(tmp_path / "data", fmt, layout, variant=variant, n_train=30, n_test=12,
                        hub_cache=offline_hub)
    s = settings(data.corpus)
    task = load_task_data(s.corpus, s.prompts.test_fraction, s.seed)
    assert pairs(task.train) == expected_pairs(fmt, variant, data.splits["train"])
    assert pairs(task.test) == expected_pairs(fmt, variant, data.splits["test"])
    assert task.train["text_id"].str.starts_with("train:").all()
    assert task.test["text_id"].str.starts_with("test:").all()
    tables = prompt_tables(task, fmt, s.prompts, s.seed)
    for split, frame in (("train", task.train), ("test", task.test), ("pref", task.train)):
        t = tables[split]
        source = frame.join(t.select("text_id", pl.col("prompt").alias("p")), on="text_id")
        assert source.height == t.height == TINY_PROMPTS[f"n_{split}"]
        if fmt == "text_prefix":  # a 2-8 word prefix of the source text
            assert all(x.startswith(p) for x, p in zip(source["text"], source["p"], strict=True))
            assert t["n_words"].is_between(2, 8).all()
        else:  # the full prompt, its words counted without role markers
            assert source["p"].to_list() == source["prompt"].to_list()
            words = [sum(len(m["content"].split()) for m in prompt_messages(p))
                     for p in t["prompt"]]
            assert t["n_words"].to_list() == words and min(words) > 0


def test_hub_dataset_loads_by_id_offline_in_a_fresh_process(tmp_path):
    """HF_HUB_CACHE + HF_HUB_OFFLINE=1 in the environment, as on a cluster: the id resolves to
    the hub-cache snapshot (datasets alone would refuse it offline)."""
    cache = tmp_path / "hub"
    snapshot = write_hub_dataset(cache, "someone/reviews", {"train": imdb_rows(9)})
    assert (cache / "datasets--someone--reviews/refs/main").read_text() == snapshot.name
    assert (snapshot / "data/train-00000-of-00001.parquet").is_symlink()
    code = ("import sys; from pipeline_lib.io.datasets import load_split;"
            "from pipeline_lib.settings.config import load_config;"
            "from pipeline_lib.settings.sections import Settings;"
            "s = Settings.from_config(load_config(sys.argv[1], {'corpus': {'dataset': sys.argv[2],"
            "'group_column': None, 'filter': None}}));"
            "print(load_split(s.corpus, 'train')['text'][0])")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "home")}
    run = lambda repo: subprocess.run(  # noqa: E731
        [sys.executable, "-c", code, str(ROOT / "tests/data/tiny.yaml"), repo],
        capture_output=True, text=True, env=env, cwd=ROOT)
    ok = run("someone/reviews")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip().splitlines()[-1] == imdb_rows(9)[0]["text"]
    missing = run("someone/else")
    assert missing.returncode != 0
    assert ("DatasetSourceError: config key corpus.dataset: 'someone/else' is not a local "
            "folder, nor a hub dataset in the Hugging Face cache") in missing.stderr


def test_saved_single_dataset_and_dataset_config(tmp_path, offline_hub):
    import datasets

    datasets.Dataset.from_list(hh_rows(20)).save_to_disk(str(tmp_path / "one"))
    base = {"format": "hh", "group_column": None, "filter": None}
    task = load_task_data(settings({**base, "dataset": str(tmp_path / "one")}).corpus, 0.25, 0)
    assert task.split_by == "group" and task.train.height + task.test.height == 20
    with pytest.raises(DatasetSourceError, match="config key corpus.test_split: the save_to_disk "
                                                 "folder holds one Dataset"):
        load_task_data(settings({**base, "dataset": str(tmp_path / "one"),
                                 "test_split": "test"}).corpus, 0.25, 0)
    folder = write_parquet_folder(tmp_path / "folder", {"train": hh_rows(10)})
    assert load_split(settings({**base, "dataset": str(folder), "dataset_config": "default"}
                               ).corpus, "train").num_rows == 10
    with pytest.raises(DatasetSourceError, match="config key corpus.dataset_config: .*'nope'"):
        load_split(settings({**base, "dataset": str(folder), "dataset_config": "nope"}).corpus,
                   "train")


def test_an_edited_local_folder_is_read_afresh(tmp_path):
    """datasets caches a local folder with a `configs:` card by its name; the loader does not
    reuse that cache, so editing a file (which reruns the prompts rule) changes the rows."""
    folder = write_parquet_folder(tmp_path / "data", {"train": imdb_rows(5)})
    cfg = settings({"dataset": str(folder), "format": "text_prefix", "group_column": None,
                    "filter": None}).corpus
    assert load_split(cfg, "train").num_rows == 5
    write_parquet_folder(tmp_path / "data", {"train": imdb_rows(7, seed=3)})
    assert load_split(cfg, "train")["text"] == [r["text"] for r in imdb_rows(7, seed=3)]


def test_local_dataset_files_are_the_rule_inputs(tmp_path):
    folder = write_parquet_folder(tmp_path / "folder", {"train": imdb_rows(3)})
    (folder / ".cache").mkdir()
    (folder / ".cache" / "lock").write_text("")
    assert local_dataset_files(str(folder)) == [str(folder / "README.md"),
                                                str(folder / "data/train-00000-of-00001.parquet")]
    for name in ("a.jsonl", "b.jsonl"):
        (tmp_path / name).write_text("{}\n")
    later = str(tmp_path / "made-by-a-rule.jsonl")
    assert local_dataset_files("json", {"train": str(tmp_path / "*.jsonl"), "test": later}) == [
        str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), later]
    assert local_dataset_files("org/name", {"train": "sub/train.jsonl"}) == []
    assert local_dataset_files(None) == []


# ---------------------------------------------------------------------------------------------
# Train / test disjointness, determinism
# ---------------------------------------------------------------------------------------------
def test_dataset_split_drops_test_rows_that_repeat_a_train_prompt(tmp_path):
    train, test = alpaca_rows(40), alpaca_rows(10, split="test")
    test[3] = dict(train[5])  # the same prompt in both splits
    data = tiny_dataset(tmp_path, "prompt", "jsonl", variant="alpaca")
    for split, rows in (("train", train), ("test", test)):
        Path(data.corpus["data_files"][split]).write_text(
            "".join(json.dumps(r) + "\n" for r in rows))
    s = settings(data.corpus)
    task = load_task_data(s.corpus, s.prompts.test_fraction, s.seed)
    assert task.split_by == "dataset split"
    assert task.train.height == 40 and task.test.height == 9
    assert set(task.train["prompt"]).isdisjoint(set(task.test["prompt"]))


@pytest.mark.parametrize(("fmt", "group"), [("prompt", "subreddit"), ("messages", "topic"),
                                             ("hh", None)])
def test_group_split_is_disjoint_and_seeded(tmp_path, fmt, group):
    data = tiny_dataset(tmp_path, fmt, "parquet_folder", split_by="group", n_train=60)
    assert data.corpus["group_column"] == group and data.corpus["test_split"] is None
    s = settings(data.corpus)
    task = load_task_data(s.corpus, 0.3, seed=0)
    assert task.split_by == "group"
    assert set(task.train["group"]).isdisjoint(set(task.test["group"]))
    assert set(task.train["prompt"]).isdisjoint(set(task.test["prompt"]))
    tables = prompt_tables(task, fmt, s.prompts, seed=0)
    assert set(tables["pref"]["prompt"]).isdisjoint(set(tables["train"]["prompt"]))
    assert set(tables["test"]["group"]).isdisjoint(set(task.train["group"]))
    again = prompt_tables(load_task_data(s.corpus, 0.3, seed=0), fmt, s.prompts, seed=0)
    other = prompt_tables(load_task_data(s.corpus, 0.3, seed=1), fmt, s.prompts, seed=1)
    assert all(tables[k].equals(again[k]) for k in tables)
    assert not tables["train"].equals(other["train"])


def test_rows_with_the_same_prompt_share_a_group_and_one_prompt(tmp_path):
    """Without group_column, identical prompts (HH has many) are one group: never on both sides
    of the split, and drawn once."""
    rows = hh_rows(12)
    dupes = [{"chosen": rows[0]["chosen"].rsplit("Assistant:", 1)[0] + f"Assistant: other {i}",
              "rejected": "x"} for i in range(6)]
    df = pl.DataFrame(rows + dupes)
    cfg = corpus_cfg(format="hh")
    ex = corpus_examples(df, cfg, "src", "train:")
    assert ex.height == 18
    first = ex.filter(pl.col("text_id") == "train:0")
    assert ex.filter(pl.col("prompt") == first["prompt"][0])["group"].to_list() == ["train:0"] * 7
    picked = select_prompts(ex, 12, "train", seed=0)
    assert picked["prompt"].n_unique() == 12
    with pytest.raises(CorpusError, match=r"has 12 usable prompts, fewer than the 13 prompts "
                                          r"requested \(config key prompts.n_train\)"):
        select_prompts(ex, 13, "train", seed=0)


def test_empty_prompts_are_skipped():
    df = pl.DataFrame({"prompt": ["a question", "", "   ", None, "another"],
                       "target": ["x", "y", "z", "w", None]})
    ex = corpus_examples(df, corpus_cfg(target_column="target"), "src")
    assert ex["prompt"].to_list() == ["a question", "another"]
    assert ex["text"].to_list() == ["x", ""]  # '' = no SFT target
    with pytest.raises(CorpusError, match="src: no usable prompts"):
        corpus_examples(df.head(0), corpus_cfg(target_column="target"), "src")


# ---------------------------------------------------------------------------------------------
# The stage: corpus tables, SFT target checks
# ---------------------------------------------------------------------------------------------
def run_stage(tmp_path, cfg):
    prompts = {s: tmp_path / f"prompts-{s}.parquet" for s in ("train", "test", "pref")}
    corpus = {s: tmp_path / f"corpus-{s}.parquet" for s in ("train", "test")}
    run_prompts(cfg, prompts, corpus)
    return ({s: read_polars(p, "prompts") for s, p in prompts.items()},
            {s: read_corpus(p) for s, p in corpus.items()})


def test_stage_writes_prompts_and_sft_pairs(tmp_path):
    data = tiny_dataset(tmp_path / "d", "messages", "saved")
    cfg = load_config(ROOT / "tests/data/tiny.yaml", {"corpus": data.corpus,
                                                      "prompts": TINY_PROMPTS})
    prompts, corpus = run_stage(tmp_path, cfg)
    assert {s: t.height for s, t in prompts.items()} == {"train": 8, "test": 4, "pref": 16}
    train = corpus["train"]
    assert train.columns == ["text_id", "group", "text", "prompt"] and train.height == 120
    assert train["prompt"].null_count() == 0
    assert (train["text"] == "").sum() == 12  # every tenth conversation ends with a user turn
    assert pairs(train) == expected_pairs("messages", None, data.splits["train"])


def test_sft_enabled_needs_targets(tmp_path):
    data = tiny_dataset(tmp_path / "d", "prompt", "jsonl")
    no_target = {**data.corpus, "target_column": None}
    with pytest.raises(ConfigError, match=r"^config key corpus.target_column is null, so format "
                                          r"'prompt' has no SFT target, but sft.enabled is true"):
        load_config(ROOT / "tests/data/tiny.yaml", {"corpus": no_target, "prompts": TINY_PROMPTS})
    cfg = load_config(ROOT / "tests/data/tiny.yaml", {
        "corpus": no_target, "sft": {"enabled": False}, "policy": {"base": "tiny-random/gpt2"},
        "prompts": TINY_PROMPTS})
    _, corpus = run_stage(tmp_path, cfg)
    assert (corpus["train"]["text"] == "").all()
    # messages that all end with a user turn: known only once read
    rows = [{"messages": r["messages"][:-1] if r["messages"][-1]["role"] == "assistant"
             else r["messages"]} for r in messages_rows(40)]
    folder = write_parquet_folder(tmp_path / "m", {"train": rows})
    cfg = load_config(ROOT / "tests/data/tiny.yaml", {
        "corpus": {"format": "messages", "dataset": str(folder), "group_column": None,
                   "filter": None}, "prompts": TINY_PROMPTS})
    with pytest.raises(CorpusError, match=r"no train row has an SFT target \(config key "
                                          r"corpus.messages_column; format 'messages'\)"):
        run_stage(tmp_path, cfg)


def test_old_corpus_tables_read_with_a_null_prompt(tmp_path):
    path = tmp_path / "corpus-train.parquet"
    pq.write_table(pa.table({"text_id": ["t0"], "group": ["g"], "text": ["a whole review"]}),
                   path)
    old = read_corpus(path)
    assert old.columns == ["text_id", "group", "text", "prompt"]
    assert old["prompt"].to_list() == [None]
    write_table({"text_id": ["t0"], "group": ["g"], "text": ["ok"], "prompt": ["q"]},
                path, "corpus")
    assert read_corpus(path)["prompt"].to_list() == ["q"]


# ---------------------------------------------------------------------------------------------
# The default task: the same prompts as before these formats existed
# ---------------------------------------------------------------------------------------------
def prompts_digest(tables) -> str:
    h = hashlib.sha256()
    for split in ("train", "test", "pref"):
        for col in ("prompt_id", "prompt", "text_id", "group", "n_words"):
            h.update("\x1f".join(map(str, tables[split][col].to_list())).encode())
            h.update(b"\x1e")
    return h.hexdigest()[:16]


@pytest.mark.parametrize(("config", "digest"), [
    # computed with the committed code before this change (b505441: pipeline_lib/io/corpus.py's
    # load_corpus, split_by_group and make_prompts, as the prompts stage called them)
    ("config/config.yaml", "0287d7a38e39a3c6"),
    ("tests/data/tiny.yaml", "73079778fe7f5e01"),
])
def test_default_task_prompts_are_unchanged(config, digest):
    s = Settings.from_config(load_config(ROOT / config))
    task = load_task_data(s.corpus, s.prompts.test_fraction, s.seed)
    assert task.train["prompt"].null_count() == task.train.height
    assert prompts_digest(prompt_tables(task, s.corpus.format, s.prompts, s.seed)) == digest


# ---------------------------------------------------------------------------------------------
# Completion-only SFT
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from pipeline_lib.models.loading import build_scratch_policy, train_tokenizer

    torch.manual_seed(0)
    texts = [r["text"] for r in imdb_rows(60)] + [r["output"] for r in alpaca_rows(30)]
    tok = train_tokenizer(texts, vocab_size=300)
    model = build_scratch_policy(tok, n_positions=64, n_embd=32, n_layer=1, n_head=2).eval()
    return tok, model


def hand_loss(model, examples) -> float:
    """Mean of -log p(token) over every target position (after the prompt), by hand."""
    nll = []
    with torch.no_grad():
        for ids, n_prompt in examples:
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
            nll += [-float(logp[t - 1, ids[t]]) for t in range(max(n_prompt, 1), len(ids))]
    return sum(nll) / len(nll)


def test_completion_only_loss_is_the_target_token_mean(tiny_lm):
    tok, model = tiny_lm
    model.eval()  # no dropout: the loss is a function of the ids
    pairs_ = [("Write a poem about the film", " great moving story"),
              ("Explain the plot", " dull and boring but the cast was warm"),
              ("List three", " funny")]
    examples = [encode_completion(tok, p, t, 64) for p, t in pairs_]
    for (p, t), (ids, n) in zip(pairs_, examples, strict=True):
        assert ids[:n] == encode_prompt(tok, p)
        assert ids[n:] == [*tok(t, add_special_tokens=False)["input_ids"], tok.eos_token_id]
    with torch.no_grad():
        loss, _ = _lm_loss(model, examples, tok.pad_token_id, "cpu")
    assert float(loss) == pytest.approx(hand_loss(model, examples), rel=1e-5)
    # the same ids trained on whole (no prompt) give another loss: the mask matters
    whole = [(ids, 0) for ids, _ in examples]
    with torch.no_grad():
        loss_whole, _ = _lm_loss(model, whole, tok.pad_token_id, "cpu")
    assert float(loss_whole) == pytest.approx(
        hand_loss(model, whole), rel=1e-5)
    assert abs(hand_loss(model, whole) - hand_loss(model, examples)) > 1e-3
    seqs, masked = [ids for ids, _ in examples], [n for _, n in examples]
    expected = hand_loss(model, examples)
    assert lm_eval_loss(model, seqs, tok.pad_token_id, "cpu", 2, masked) == pytest.approx(
        expected, rel=1e-5)  # batches of 2, weighted by their target tokens
    model.eval()  # lm_eval_loss leaves the model in train mode


def test_prompt_less_examples_are_the_whole_text_as_before(tiny_lm):
    tok, _ = tiny_lm
    texts = [r["text"] for r in imdb_rows(5)]
    encoded, stats = encode_sft_examples(tok, texts, None, 16)
    assert encoded == [(ids, 0) for ids in encode_lm_texts(tok, texts, 16)]
    assert stats == dict(prompted=0, no_target=0, too_long=0, truncated=0)
    mixed, _ = encode_sft_examples(tok, texts[:2], [None, "a prompt"], 64)
    assert mixed[0] == (encode_lm_texts(tok, texts[:1], 64)[0], 0) and mixed[1][1] > 0


def test_truncation_keeps_target_tokens_or_drops_the_example(tiny_lm):
    tok, _ = tiny_lm
    prompt, target = "Explain the plot of this film", " dull and boring but the cast was warm"
    n_prompt = len(encode_prompt(tok, prompt))
    ids, n = encode_completion(tok, prompt, target, n_prompt + 2)
    assert n == n_prompt and len(ids) == n_prompt + 2  # two target tokens, EOS cut
    assert encode_completion(tok, prompt, target, n_prompt) is None
    assert encode_completion(tok, prompt, "", 64) is None
    _, stats = encode_sft_examples(tok, [target, target, ""], [prompt, "x " * 80, "q"],
                                   n_prompt + 2)
    assert stats == dict(prompted=3, no_target=1, too_long=1, truncated=1)


def test_chat_template_prompts_are_encoded_with_the_template(tiny_lm):
    tok = copy.deepcopy(tiny_lm[0])  # the module's tokenizer keeps no template
    tok.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    prompt = messages_to_prompt([{"role": "system", "content": "Be kind."},
                                 {"role": "user", "content": "Hi"}])
    ids, n = encode_completion(tok, prompt, "Hello", 64)
    rendered = "<system>Be kind.\n<user>Hi\n<assistant>"
    assert tok.decode(ids[:n]) == rendered
    assert ids[n:] == [*tok("Hello", add_special_tokens=False)["input_ids"], tok.eos_token_id]


def test_imdb_like_rows_are_reproducible():
    assert imdb_rows(5) == imdb_rows(5) and imdb_rows(5) != imdb_rows(5, seed=1)
    assert imdb_rows(3, split="test") != imdb_rows(3)
    assert tldr_rows(2)[0]["summary"].startswith(" ")


def test_a_prompt_in_two_groups_never_reaches_test(tmp_path):
    """Held-out groups split rows, not prompts: the same prompt under two topics would be in
    both splits; the test side drops it."""
    rows = [{"prompt": f"question {i}", "topic": f"t{i % 6}", "answer": "a"} for i in range(30)]
    rows += [{"prompt": f"question {i}", "topic": f"t{(i + 1) % 6}", "answer": "b"}
             for i in range(12)]
    folder = write_parquet_folder(tmp_path / "d", {"train": rows})
    s = settings({"format": "prompt", "dataset": str(folder), "group_column": "topic",
                  "filter": None, "target_column": "answer"})
    task = load_task_data(s.corpus, 0.3, seed=0)
    assert task.test.height > 0
    assert set(task.train["prompt"]).isdisjoint(set(task.test["prompt"]))
    assert set(task.train["group"]).isdisjoint(set(task.test["group"]))
    assert task.train.height + task.test.height < len(rows)  # the shared prompts left test


def test_text_prefixes_in_tokens_of_the_policy_tokenizer(tmp_path, tiny_hub):
    """prompts.prefix_unit tokens (the vBoN paper's 2-8 token prefixes): each prompt is the
    first k tokens of its text under policy.base's tokenizer, k in [min, max]; a scratch policy
    (its tokenizer does not exist yet) is refused."""
    from pipeline_lib.io.corpus import make_prompts
    from pipeline_lib.models.loading import load_tokenizer

    tok = load_tokenizer(tiny_hub.ids["gpt2"])
    texts = pl.DataFrame({"text_id": [f"t{i}" for i in range(30)], "group": ["g"] * 30,
                          "text": [r["text"] for r in imdb_rows(30)]})
    table = make_prompts(texts, 20, "train", 2, 5, seed=0, tokenizer=tok)
    for prompt, text in zip(table["prompt"], texts.filter(
            pl.col("text_id").is_in(table["text_id"].implode()))["text"], strict=False):
        assert text.startswith(prompt)
    lengths = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in table["prompt"]]
    assert min(lengths) >= 2 and max(lengths) <= 5 and len(set(lengths)) > 1
    with pytest.raises(ConfigError, match="prompts.prefix_unit"):
        load_config(ROOT / "tests/data/tiny.yaml", {"prompts": {"prefix_unit": "tokens"}})


def test_hub_data_files_are_read_by_extension_without_running_a_loading_script(tmp_path,
                                                                              offline_hub):
    """A hub dataset that still ships a loading script (tatsu-lab/alpaca_eval: alpaca_eval.py +
    alpaca_eval.json) is read through corpus.data_files with the json builder; the script never
    runs. A missing file or mixed extensions are one-line errors naming the key."""
    from support.tiny_data import write_hub_files

    rows = [{"instruction": f"say {w}", "output": w} for w in ("hi", "yes", "no")]
    write_hub_files(offline_hub, "org/script-data", {
        "script-data.py": "raise RuntimeError('the loading script ran')\n",
        "data/eval.json": json.dumps(rows), "data/other.csv": "a\n1\n"})
    base = {"dataset": "org/script-data", "group_column": None, "filter": None}
    ds = load_split(settings({**base, "data_files": "data/eval.json"}).corpus, "train")
    assert ds["instruction"] == [r["instruction"] for r in rows]
    with pytest.raises(DatasetSourceError, match="config key corpus.data_files: no file "
                                                 "data/missing.json in the repository"):
        load_split(settings({**base, "data_files": "data/missing.json"}).corpus, "train")
    with pytest.raises(DatasetSourceError, match="config key corpus.data_files: .* must all "
                                                 "end in one of"):
        load_split(settings({**base, "data_files": ["data/eval.json", "data/other.csv"]}).corpus,
                   "train")
    with pytest.raises(DatasetSourceError, match="hf download org/absent --repo-type dataset"):
        load_split(settings({**base, "dataset": "org/absent",
                             "data_files": "x.json"}).corpus, "train")


def test_prs_instructions_from_a_dataset(tmp_path, offline_hub, config):
    """prs_compare.instructions 'dataset' reads instruction_data through load_split; its
    errors name the prs_compare keys."""
    from support.tiny_data import write_hub_files

    from pipeline_lib.stages.common import StageError
    from pipeline_lib.stages.prs_instructions import run_prs_instructions

    rows = [{"instruction": f"question {i}?", "output": "a"} for i in range(6)]
    write_hub_files(offline_hub, "org/evalset", {"evalset.py": "raise RuntimeError\n",
                                                  "evalset.json": json.dumps(rows)})
    cfg = copy.deepcopy(config)
    cfg["prs_compare"].update(instructions="dataset", n_prompts=4, instruction_data={
        "dataset": "org/evalset", "data_files": "evalset.json", "split": "train",
        "column": "instruction"})
    cfg = load_config_dict(cfg)
    run_prs_instructions(cfg, tmp_path / "prs.parquet")
    got = read_polars(tmp_path / "prs.parquet", "prompts")["prompt"].to_list()
    assert len(got) == 4 and set(got) <= {r["instruction"] for r in rows}
    cfg["prs_compare"]["instruction_data"]["column"] = "question"
    with pytest.raises(StageError, match=r"no column 'question' \(config key "
                                         r"prs_compare.instruction_data.column\)"):
        run_prs_instructions(cfg, tmp_path / "prs2.parquet")
    cfg["prs_compare"]["instruction_data"].update(dataset="org/none", column="instruction")
    with pytest.raises(StageError, match="config key prs_compare.instruction_data.dataset: "
                                         "'org/none' is not a local folder"):
        run_prs_instructions(cfg, tmp_path / "prs3.parquet")
    bad = copy.deepcopy(config)
    bad["prs_compare"].update(instructions="dataset")
    with pytest.raises(ConfigError, match="prs_compare.instruction_data.dataset is required"):
        load_config_dict(bad)


def load_config_dict(cfg: dict) -> dict:
    from pipeline_lib.settings.config import validate_config

    return validate_config(copy.deepcopy(cfg))
