"""Tiny datasets in every ``corpus.format``, on disk the ways users have them, loaded through
``datasets`` by the prompts stage; for unit tests and tiny end-to-end DAG runs.

Rows (plain dicts, the same for a given ``seed``; a split's rows come from ``seed`` and the
split name, so train and test differ):

=====================  ==============  ===================================================
builder                corpus.format   columns
=====================  ==============  ===================================================
:func:`imdb_rows`      text_prefix     ``text`` (an 8-16 word review), ``label`` (0/1)
:func:`tldr_rows`      prompt          ``subreddit``, ``title``, ``post``, ``summary``
:func:`alpaca_rows`    prompt          ``instruction``, ``input`` ('' in every third row),
                                       ``output``
:func:`hh_rows`        hh              ``chosen``, ``rejected``: Anthropic-HH transcripts of
                                       one or two turns ("\\n\\nHuman: ..\\n\\nAssistant: ..")
:func:`messages_rows`  messages        ``messages`` (role/content; a system message in
                                       every other row, one or two user turns, ending in an
                                       assistant turn except every tenth row), ``topic``
=====================  ==============  ===================================================

Layouts, each taking ``{split: rows}``:

- :func:`write_parquet_folder` -> ``root`` laid out as a hub dataset repository:
  ``README.md`` (its ``configs:`` card) and ``data/<split>-00000-of-00001.parquet``;
- :func:`write_jsonl` -> ``{split: root/<split>.jsonl}``;
- :func:`write_saved` -> ``root`` written by ``DatasetDict.save_to_disk``;
- :func:`write_hub_dataset` -> the same repository placed in a Hugging Face hub cache
  (``<cache>/datasets--<org>--<name>/{blobs,refs/main,snapshots/<commit>/...}``, snapshot files
  relative symlinks to the blobs, as ``hf download <id> --repo-type dataset`` leaves it).
  ``datasets.load_dataset(<id>)`` itself does not read the hub cache offline (with
  ``HF_HUB_OFFLINE=1`` it only reads its own prepared copies, ``HF_DATASETS_CACHE``); the
  pipeline's loader (``pipeline_lib.io.datasets.load_split``) falls back to the snapshot, so
  ``corpus.dataset: <id>`` works offline with ``HF_HUB_CACHE=<cache> HF_HUB_OFFLINE=1``.

One call for a DAG config, :func:`tiny_dataset`::

    data = tiny_dataset(tmp_path / "data", "hh", "parquet_folder")
    cfg["corpus"] = data.corpus                 # the whole corpus section (a dict)
    cfg["prompts"] = {"n_train": 8, "n_test": 4, "n_pref": 16}
    env = {**os.environ, **data.env}            # for the subprocess (HF_* variables)

``layout`` is ``parquet_folder``, ``jsonl``, ``saved`` or ``hub`` (``hub_cache=`` the cache
folder, e.g. the tiny model hub's, ``repo_id=`` the id); ``split_by`` is ``dataset`` (the
``test`` split is ``corpus.test_split``) or ``group`` (``test_split: null``; groups of
:data:`GROUP_COLUMNS` or one per prompt). ``format`` ``prompt`` reads the TL;DR-like rows
through a template unless ``variant="alpaca"``. Default sizes (120 train rows, 40 test rows)
suit ``prompts: {n_train: 8, n_test: 4, n_pref: 16}``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Rows = list[dict[str, Any]]

TLDR_TEMPLATE = "SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR:"
ALPACA_TEMPLATE = "{instruction}\n\n{input}"
GROUP_COLUMNS = {"text_prefix": None, "prompt": "subreddit", "hh": None, "messages": "topic"}
LAYOUTS = ("parquet_folder", "jsonl", "saved", "hub")

_GOOD = ["wonderful", "great", "moving", "funny", "charming", "brilliant", "warm", "lovely"]
_BAD = ["dull", "awful", "boring", "clumsy", "bland", "tedious", "messy", "weak"]
_NOUNS = ["film", "story", "cast", "plot", "ending", "score", "script", "director", "scene"]
_FILLER = ["the", "a", "this", "really", "quite", "and", "but", "with", "of", "very", "so"]
_SUBREDDITS = ["relationships", "personalfinance", "cooking", "running", "books", "travel"]
_TOPICS = ["food", "music", "sports", "weather", "pets", "movies"]
_VERBS = ["write", "explain", "describe", "summarise", "list", "suggest"]
_THINGS = ["a poem", "a film", "a good movie", "the cast", "a comedy", "the plot",
           "a short story", "the ending"]


def _rng(seed: int, split: str) -> random.Random:
    return random.Random(int(hashlib.sha256(f"{seed}:{split}".encode()).hexdigest()[:12], 16))


def _sentence(rng: random.Random, n: int, mood: int | None = None) -> str:
    words = []
    for _ in range(n):
        pool = rng.choice([_FILLER, _NOUNS, _GOOD if mood in (None, 1) else _BAD,
                           _BAD if mood in (None, 0) else _GOOD])
        words.append(rng.choice(pool))
    return " ".join(words)


def imdb_rows(n: int = 120, seed: int = 0, split: str = "train") -> Rows:
    """IMDB-like reviews: ``text`` (8-16 words, leaning positive or negative), ``label``."""
    rng = _rng(seed, f"imdb:{split}")
    out = []
    for i in range(n):
        label = i % 2
        text = f"{_sentence(rng, rng.randint(6, 14), label)} {rng.choice(_NOUNS)} {i}."
        out.append({"text": text.capitalize(), "label": label})
    return out


def tldr_rows(n: int = 120, seed: int = 0, split: str = "train") -> Rows:
    """TL;DR-like posts: ``subreddit``, ``title``, ``post`` and a reference ``summary``."""
    rng = _rng(seed, f"tldr:{split}")
    return [{"subreddit": _SUBREDDITS[i % len(_SUBREDDITS)],
             "title": f"{_sentence(rng, 2)} {i}",
             "post": _sentence(rng, rng.randint(3, 6)),
             "summary": " " + _sentence(rng, rng.randint(2, 4))} for i in range(n)]


def alpaca_rows(n: int = 120, seed: int = 0, split: str = "train") -> Rows:
    """AlpacaFarm-like instructions: ``instruction``, ``input`` ('' in every third row),
    ``output``."""
    rng = _rng(seed, f"alpaca:{split}")
    return [{"instruction": f"{rng.choice(_VERBS).capitalize()} {rng.choice(_THINGS)} {i}.",
             "input": "" if i % 3 == 0 else _sentence(rng, rng.randint(2, 4)),
             "output": _sentence(rng, rng.randint(3, 6), 1)} for i in range(n)]


def _hh_turns(rng: random.Random, i: int, split: str) -> list[tuple[str, str]]:
    turns = [(f"Tell me about {rng.choice(_THINGS)} {i}?", _sentence(rng, rng.randint(2, 5), 1))]
    if i % 2:
        turns.append((f"And the {rng.choice(_NOUNS)}?", _sentence(rng, rng.randint(2, 5), 1)))
    return turns


def hh_rows(n: int = 120, seed: int = 0, split: str = "train") -> Rows:
    """Anthropic-HH-like pairs: ``chosen`` and ``rejected`` transcripts (same prompt, one or two
    turns, different last replies)."""
    rng = _rng(seed, f"hh:{split}")
    out = []
    for i in range(n):
        turns = _hh_turns(rng, i, split)
        head = "".join(f"\n\nHuman: {q}\n\nAssistant: {a}" for q, a in turns[:-1])
        head += f"\n\nHuman: {turns[-1][0]}\n\nAssistant:"
        out.append({"chosen": f"{head} {turns[-1][1]}",
                    "rejected": f"{head} {_sentence(rng, rng.randint(2, 5), 0)}"})
    return out


def messages_rows(n: int = 120, seed: int = 0, split: str = "train") -> Rows:
    """Chat conversations: ``messages`` (a system message in every other row, one or two user
    turns, ending with an assistant turn except in every tenth row) and ``topic``."""
    rng = _rng(seed, f"messages:{split}")
    out = []
    for i in range(n):
        msgs = [{"role": "system", "content": "Be kind."}] if i % 2 == 0 else []
        for q, a in _hh_turns(rng, i, split):
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        if i % 10 == 9:
            msgs.pop()  # ends with a user turn: a prompt without an SFT target
        out.append({"messages": msgs, "topic": _TOPICS[i % len(_TOPICS)]})
    return out


ROW_BUILDERS = {"text_prefix": imdb_rows, "prompt": tldr_rows, "alpaca": alpaca_rows,
                "hh": hh_rows, "messages": messages_rows}


def split_rows(kind: str, n_train: int = 120, n_test: int = 40, seed: int = 0) -> dict[str, Rows]:
    """``{"train": rows, "test": rows}`` of a builder of :data:`ROW_BUILDERS` (``kind``: a
    format, or ``alpaca``)."""
    build = ROW_BUILDERS[kind]
    return {"train": build(n_train, seed, "train"), "test": build(n_test, seed, "test")}


# ---------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------
def _card(splits: Sequence[str], config_name: str = "default") -> str:
    files = "".join(f"  - split: {s}\n    path: {config_name}/{s}-*\n" for s in splits)
    return (f"---\nconfigs:\n- config_name: {config_name}\n  data_files:\n{files}---\n"
            "# tiny test data\n")


def write_parquet_folder(root: str | Path, splits: Mapping[str, Rows],
                         config_name: str | None = None) -> Path:
    """A hub-style dataset folder: ``README.md`` and ``data/<split>-00000-of-00001.parquet``
    (with ``config_name``: that configuration, in ``<config_name>/``, as multi-config repos
    such as tatsu-lab/alpaca_farm lay them out)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(root)
    folder = config_name or "data"
    (root / folder).mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        pq.write_table(pa.Table.from_pylist(rows), root / folder / f"{split}-00000-of-00001.parquet")
    card = _card(list(splits), config_name or "default")
    (root / "README.md").write_text(card if config_name else card.replace("path: default/",
                                                                          "path: data/"))
    return root


def write_jsonl(root: str | Path, splits: Mapping[str, Rows]) -> dict[str, Path]:
    """One JSON-lines file per split: ``root/<split>.jsonl``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, rows in splits.items():
        out[split] = root / f"{split}.jsonl"
        out[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def write_saved(root: str | Path, splits: Mapping[str, Rows]) -> Path:
    """A ``DatasetDict.save_to_disk`` folder (``dataset_dict.json``, one folder per split)."""
    import datasets

    datasets.disable_progress_bars()
    datasets.DatasetDict({s: datasets.Dataset.from_list(r) for s, r in splits.items()}
                         ).save_to_disk(str(root))
    return Path(root)


def write_hub_dataset(cache: str | Path, repo_id: str, splits: Mapping[str, Rows],
                      commit: str | None = None, config_name: str | None = None) -> Path:
    """The dataset repository of :func:`write_parquet_folder` placed in hub cache ``cache``
    under ``repo_id`` (``refs/main`` -> ``commit``, a fake 40-hex hash by default); returns the
    snapshot folder."""
    return write_hub_repo(cache, repo_id, lambda staging: write_parquet_folder(
        staging, splits, config_name), commit)


def write_hub_files(cache: str | Path, repo_id: str, files: Mapping[str, str | bytes],
                    commit: str | None = None) -> Path:
    """A dataset repository of the given files (relative path -> content) in hub cache
    ``cache`` under ``repo_id``; returns the snapshot folder."""
    def write(staging: Path) -> None:
        for rel, content in files.items():
            path = staging / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content.encode() if isinstance(content, str) else content)

    return write_hub_repo(cache, repo_id, write, commit)


def write_hub_repo(cache: str | Path, repo_id: str, write, commit: str | None = None) -> Path:
    """The files ``write(folder)`` writes, placed in hub cache ``cache`` as dataset repository
    ``repo_id`` (blobs, ``refs/main`` -> ``commit``, snapshot symlinks); returns the snapshot."""
    cache = Path(cache)
    repo = cache / f"datasets--{repo_id.replace('/', '--')}"
    commit = commit or hashlib.sha1(f"dataset:{repo_id}".encode()).hexdigest()
    staging = repo / ".staging"
    staging.mkdir(parents=True, exist_ok=True)
    write(staging)
    snapshot = repo / "snapshots" / commit
    for src in sorted(p for p in staging.rglob("*") if p.is_file()):
        data = src.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        dst = snapshot / src.relative_to(staging)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.is_symlink() or dst.exists():
            dst.unlink()
        dst.symlink_to(os.path.relpath(blob, dst.parent))
        src.unlink()
    for d in sorted((p for p in staging.rglob("*") if p.is_dir()), reverse=True):
        d.rmdir()
    staging.rmdir()
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


# ---------------------------------------------------------------------------------------------
# One call: rows + layout + the corpus config section
# ---------------------------------------------------------------------------------------------
@dataclass
class TinyDataset:
    """A tiny dataset on disk: ``corpus`` is the whole config section that reads it, ``env``
    the environment variables it needs (the hub layout: ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``),
    ``splits`` the rows written, ``path`` what was written (folder, snapshot or files)."""

    corpus: dict[str, Any]
    splits: dict[str, Rows]
    path: Any
    env: dict[str, str] = field(default_factory=dict)


def format_keys(fmt: str, variant: str | None = None) -> dict[str, Any]:
    """The ``corpus`` keys that read the rows of format ``fmt`` (``variant="alpaca"``: the
    Alpaca-like rows of format prompt)."""
    if fmt == "text_prefix":
        return {"format": fmt, "text_column": "text", "min_words": 4}
    if fmt == "prompt" and variant == "alpaca":
        return {"format": fmt, "template": ALPACA_TEMPLATE, "target_column": "output"}
    if fmt == "prompt":
        return {"format": fmt, "template": TLDR_TEMPLATE, "target_column": "summary"}
    if fmt == "hh":
        return {"format": fmt, "chosen_column": "chosen"}
    if fmt == "messages":
        return {"format": fmt, "messages_column": "messages"}
    raise ValueError(f"unknown format {fmt!r}")


def tiny_dataset(root: str | Path, fmt: str, layout: str = "parquet_folder", *,
                 split_by: str = "dataset", variant: str | None = None, n_train: int = 120,
                 n_test: int = 40, seed: int = 0, hub_cache: str | Path | None = None,
                 repo_id: str = "tiny-data/dataset") -> TinyDataset:
    """Write a tiny dataset of format ``fmt`` in ``layout`` under ``root`` and return the
    ``corpus`` config section that reads it (see the module docstring)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    root = Path(root)
    splits = split_rows(variant or fmt, n_train, n_test, seed)
    corpus: dict[str, Any] = {**format_keys(fmt, variant), "split": "train", "filter": None,
                              "test_split": "test" if split_by == "dataset" else None,
                              "group_column": (GROUP_COLUMNS[fmt] if split_by == "group"
                                               and variant != "alpaca" else None)}
    env: dict[str, str] = {}
    if layout == "parquet_folder":
        path: Any = write_parquet_folder(root, splits)
        corpus["dataset"] = str(path)
    elif layout == "jsonl":
        path = write_jsonl(root, splits)
        corpus.update(dataset="json", data_files={s: str(p) for s, p in path.items()})
    elif layout == "saved":
        path = write_saved(root, splits)
        corpus["dataset"] = str(path)
    else:
        cache = Path(hub_cache) if hub_cache is not None else root / "hub"
        path = write_hub_dataset(cache, repo_id, splits)
        corpus["dataset"] = repo_id
        env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return TinyDataset(corpus=corpus, splits=splits, path=path, env=env)
