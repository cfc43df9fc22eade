"""Published reward caches read into the project's ``samples`` and ``rewards`` tables (config
section ``reference_cache``, ``source: import``).

Three layouts (``reference_cache.format``):

- ``vbon_samples`` (the vBoN code's ``imdb-{train,test}-bon-vllm.jsonl``): one row per sample,
  ``{prompt, text, reward}``; a prompt's samples are its rows in file order. A ``text`` that
  starts with its prompt has the prompt cut off (the vBoN files store prompt + continuation).
- ``vbon_prompts`` (the vBoN code's ``tldr-sftent-train.jsonl``): one row per prompt,
  ``{prompt, rewards: [M floats]}``, optionally ``responses: [M texts]``.
- ``ensembles`` (the reward-model-ensembles BoN data): one row per prompt with ``answers[N]``,
  ``gold_scores[N]`` and one list column of proxy scores per reward-model seed.

Which column is gold and which are proxy members (``rm-<name>``) is config
(``reference_cache.gold``, ``reference_cache.proxies``); one column may be both. Every prompt
gets a stable id from its text and split (:func:`cache_prompt_id`); a prompt with fewer than M
samples, a missing field, a null or non-finite reward, or a prompt given twice (per-prompt
layouts) is a :class:`CacheImportError` naming the file and the prompt. A prompt with more than
M samples keeps its first M (file order). The imported samples carry no token ids, token
counts, EOS flags or reference log-probs (null in the ``samples`` table); ``strategy`` is
``random`` (a published cache is i.i.d. samples from its π_ref).
"""

from __future__ import annotations

import hashlib
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline_lib.io.datasets import is_saved_dataset
from pipeline_lib.io.formats import CorpusError, fill_template, template_columns
from pipeline_lib.settings.sections import ReferenceCacheSettings

FORMATS = ("vbon_samples", "vbon_prompts", "ensembles")

# The response column of each format when reference_cache.response_column is null, and
# whether the format requires it (vbon_prompts' responses are optional).
DEFAULT_RESPONSE_COLUMN = {"vbon_samples": "text", "vbon_prompts": "responses",
                           "ensembles": "answers"}
_RESPONSE_REQUIRED = {"vbon_samples": True, "vbon_prompts": False, "ensembles": True}


class CacheImportError(ValueError):
    """A published cache cannot be imported (one line naming the file, and the prompt or the
    field)."""


@dataclass(frozen=True)
class ImportedCache:
    """The columns of the ``samples`` and ``rewards`` tables of one split, and what was read."""

    samples: dict[str, list]
    rewards: dict[str, list]
    n_prompts: int
    truncated: int  # prompts that had more than M samples (their first M kept)


def cache_prompt_id(split: str, prompt: str) -> str:
    """A prompt's stable id: ``<split>-`` and the first 12 hex digits of the SHA-256 of its
    UTF-8 text (the same text gets the same id in every import)."""
    return f"{split}-{hashlib.sha256(prompt.encode('utf-8')).hexdigest()[:12]}"


def read_cache_file(path: str | Path) -> pa.Table:
    """A cache file as an Arrow table, read with ``datasets``: ``.jsonl``/``.json`` (the json
    builder: JSON Lines or a JSON array of objects; NaN and Infinity are read), ``.parquet``, a
    folder ``load_dataset`` reads (its one split), or a ``save_to_disk`` folder."""
    import datasets

    path = Path(path).expanduser()
    if not path.exists():
        raise CacheImportError(f"{path}: the cache file does not exist")
    datasets.disable_progress_bars()
    try:
        if is_saved_dataset(path):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if len(ds) != 1:
                    raise CacheImportError(f"{path}: a save_to_disk folder with splits "
                                           f"{sorted(ds)}; name one split's folder")
                ds = next(iter(ds.values()))
            return ds.data.table
        suffix = path.suffix.lower()
        builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(suffix)
        if builder is None and not path.is_dir():
            raise CacheImportError(f"{path}: unknown cache file type {suffix!r} (expected "
                                   ".jsonl, .json, .parquet or a dataset folder)")
        with tempfile.TemporaryDirectory(prefix="bon-cache-") as tmp:
            args = (builder,) if builder else (str(path),)
            kwargs = {"data_files": str(path)} if builder else {}
            dd = datasets.load_dataset(*args, **kwargs, cache_dir=tmp, keep_in_memory=True)
            if len(dd) != 1:
                raise CacheImportError(f"{path}: the folder has splits {sorted(dd)}; name one "
                                       "split's file")
            return next(iter(dd.values())).data.table
    except CacheImportError:
        raise
    except Exception as exc:  # noqa: BLE001 - reported in one line with the file
        msg = " ".join(str(exc).split()) or type(exc).__name__
        raise CacheImportError(f"{path}: cannot read the cache: {type(exc).__name__}: "
                               f"{msg}") from exc


def import_cache(table: pa.Table, cfg: ReferenceCacheSettings, split: str, m: int,
                 where: str = "<cache>") -> ImportedCache:
    """The ``samples`` and ``rewards`` columns of split ``split`` from a cache ``table`` of
    format ``cfg.format``, M = ``m`` samples per prompt (the first ``m`` of each prompt kept).
    ``where`` names the source in errors."""
    if cfg.format not in FORMATS:
        raise CacheImportError(f"config key reference_cache.format: {cfg.format!r} is not one of "
                               f"{', '.join(FORMATS)}")
    scorers = _scorers(cfg)
    response_col, response_required = _response_column(cfg)
    needed = [*_prompt_columns(cfg), *dict.fromkeys(c for _, _, c in scorers)]
    if response_required:
        needed.append(response_col)
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise CacheImportError(
            f"{where}: no field {missing[0]!r} ({_key_of(missing[0], cfg, scorers)}); the "
            f"{cfg.format} cache has fields {table.column_names}")
    prompts = _prompts(table, cfg, where)
    responses = (table.column(response_col).to_pylist() if response_col in table.column_names
                 else [None] * table.num_rows)
    values = {c: table.column(c).to_pylist() for _, _, c in scorers}
    if cfg.format == "vbon_samples":
        groups = _group_samples(prompts, responses, values, where)
    else:
        groups = _prompt_rows(prompts, responses, values, where)
    return _tables(groups, scorers, split, m, where, strip_prompt=cfg.format == "vbon_samples")


@dataclass
class _Prompt:
    prompt: str
    first_row: int
    responses: list
    values: dict[str, list]


def _scorers(cfg: ReferenceCacheSettings) -> list[tuple[str, str, str]]:
    """(scorer, kind, column): gold first, then the proxy members rm-<name> by name."""
    out = [("gold", "gold", cfg.gold)] if cfg.gold is not None else []
    out += [(f"rm-{name}", "proxy", col) for name, col in sorted(cfg.proxies.items())]
    if not any(kind == "proxy" for _, kind, _ in out):
        raise CacheImportError("config key reference_cache.proxies is empty: name at least one "
                               "proxy column")
    return out


def _response_column(cfg: ReferenceCacheSettings) -> tuple[str, bool]:
    if cfg.response_column is not None:
        return cfg.response_column, True
    return DEFAULT_RESPONSE_COLUMN[cfg.format], _RESPONSE_REQUIRED[cfg.format]


def _prompt_columns(cfg: ReferenceCacheSettings) -> list[str]:
    if cfg.prompt_template is None:
        return [cfg.prompt_column]
    try:
        return template_columns(cfg.prompt_template)
    except CorpusError as exc:
        raise CacheImportError(str(exc).replace("corpus.template",
                                                "reference_cache.prompt_template")) from None


def _key_of(column: str, cfg: ReferenceCacheSettings,
            scorers: Sequence[tuple[str, str, str]]) -> str:
    """The config key that names ``column`` (for the missing-field error)."""
    keys = [("reference_cache.gold" if kind == "gold" else f"reference_cache.proxies.{s[3:]}")
            for s, kind, c in scorers if c == column]
    if keys:
        return ", ".join(keys)
    if column in _prompt_columns(cfg):
        return ("reference_cache.prompt_template" if cfg.prompt_template
                else "reference_cache.prompt_column")
    return (f"reference_cache.response_column, default for {cfg.format}"
            if cfg.response_column is None else "reference_cache.response_column")


def _prompts(table: pa.Table, cfg: ReferenceCacheSettings, where: str) -> list[str]:
    if cfg.prompt_template is not None:
        cols = _prompt_columns(cfg)
        rows = zip(*(table.column(c).to_pylist() for c in cols), strict=True)
        return [fill_template(cfg.prompt_template, dict(zip(cols, r, strict=True))) for r in rows]
    prompts = table.column(cfg.prompt_column).to_pylist()
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise CacheImportError(f"{where}: row {i}: field {cfg.prompt_column!r} is "
                                   f"{p!r}, not a prompt text")
    return prompts


def _group_samples(prompts: list[str], responses: list, values: dict[str, list],
                   where: str) -> list[_Prompt]:
    """One sample per row: a prompt's samples are its rows in file order."""
    groups: dict[str, _Prompt] = {}
    for i, prompt in enumerate(prompts):
        g = groups.get(prompt)
        if g is None:
            g = groups[prompt] = _Prompt(prompt, i, [], {c: [] for c in values})
        g.responses.append(responses[i])
        for c, col in values.items():
            g.values[c].append(col[i])
    return list(groups.values())


def _prompt_rows(prompts: list[str], responses: list, values: dict[str, list],
                 where: str) -> list[_Prompt]:
    """One prompt per row, its samples in list columns of equal length."""
    seen: dict[str, int] = {}
    out = []
    for i, prompt in enumerate(prompts):
        if prompt in seen:
            raise CacheImportError(f"{where}: prompt {_show(prompt)} is in rows {seen[prompt]} "
                                   f"and {i}; a per-prompt cache gives each prompt once")
        seen[prompt] = i
        lists = {}
        for c, col in values.items():
            v = col[i]
            if not isinstance(v, list):
                raise CacheImportError(f"{where}: prompt {_show(prompt)} (row {i}): field {c!r} "
                                       f"is {_short(v)}, not a list of rewards")
            lists[c] = v
        lengths = {c: len(v) for c, v in lists.items()}
        resp = responses[i]
        if resp is not None:
            if not isinstance(resp, list):
                raise CacheImportError(f"{where}: prompt {_show(prompt)} (row {i}): the "
                                       f"responses are {_short(resp)}, not a list of texts")
            lengths["responses"] = len(resp)
        if len(set(lengths.values())) > 1:
            raise CacheImportError(f"{where}: prompt {_show(prompt)} (row {i}): lists of "
                                   f"different lengths {lengths}")
        n = next(iter(lengths.values()))
        out.append(_Prompt(prompt, i, resp if resp is not None else [None] * n, lists))
    return out


def _tables(groups: list[_Prompt], scorers: Sequence[tuple[str, str, str]], split: str, m: int,
            where: str, strip_prompt: bool) -> ImportedCache:
    ids: dict[str, str] = {}
    samples: dict[str, list] = {k: [] for k in ("prompt_id", "sample_idx", "prompt", "response")}
    rewards: dict[str, list] = {k: [] for k in ("prompt_id", "sample_idx", "scorer", "kind",
                                                "reward")}
    truncated = 0
    for g in groups:
        pid = cache_prompt_id(split, g.prompt)
        if pid in ids:  # a SHA-256 prefix collision: never silently merge two prompts
            raise CacheImportError(f"{where}: prompts {_show(ids[pid])} and {_show(g.prompt)} "
                                   f"share the id {pid}")
        ids[pid] = g.prompt
        n = len(g.responses)
        if n < m:
            raise CacheImportError(f"{where}: prompt {pid} {_show(g.prompt)} (row {g.first_row}) "
                                   f"has {n} samples, fewer than sampling.M.{split} = {m}")
        truncated += n > m
        for c, vals in g.values.items():
            for j, v in enumerate(vals[:m]):
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise CacheImportError(f"{where}: prompt {pid} {_show(g.prompt)}: sample {j} "
                                           f"has no reward in field {c!r} ({_short(v)})")
                if not math.isfinite(v):
                    raise CacheImportError(f"{where}: prompt {pid} {_show(g.prompt)}: sample {j} "
                                           f"has a non-finite reward {v!r} in field {c!r}")
        for j in range(m):
            resp = g.responses[j]
            if resp is not None and not isinstance(resp, str):
                raise CacheImportError(f"{where}: prompt {pid} {_show(g.prompt)}: sample {j}: "
                                       f"the response is {_short(resp)}, not a text")
            if strip_prompt and resp is not None and resp.startswith(g.prompt):
                resp = resp[len(g.prompt):]
            samples["prompt_id"].append(pid)
            samples["sample_idx"].append(j)
            samples["prompt"].append(g.prompt)
            samples["response"].append(resp)
            for scorer, kind, c in scorers:
                rewards["prompt_id"].append(pid)
                rewards["sample_idx"].append(j)
                rewards["scorer"].append(scorer)
                rewards["kind"].append(kind)
                rewards["reward"].append(float(g.values[c][j]))
    rows = len(samples["prompt_id"])
    samples |= {"response_token_ids": [None] * rows, "n_tokens": [None] * rows,
                "finished": [None] * rows, "ref_logprob": [None] * rows,
                "strategy": ["random"] * rows, "layer": [0] * rows, "parent_idx": [-1] * rows}
    if not groups:
        raise CacheImportError(f"{where}: the cache has no rows")
    return ImportedCache(samples, rewards, len(groups), truncated)


def _show(prompt: str, width: int = 60) -> str:
    return repr(prompt if len(prompt) <= width else prompt[:width] + "...")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "..."
