"""Prompt and SFT data read through ``datasets`` (config key ``corpus.dataset``).

``corpus.dataset`` names, as :func:`datasets.load_dataset` reads it:

- a hub id (``stanfordnlp/imdb``), with ``corpus.dataset_config`` (load_dataset's ``name``),
  ``corpus.revision`` and optionally ``corpus.data_files``: paths inside the repository, read
  with the builder of their extension (json, parquet, csv), which also reads repositories whose
  loading script ``datasets`` no longer runs (``tatsu-lab/alpaca_eval``: ``alpaca_eval.json``);
- a local folder: a hub-style folder (``data/train-00000-of-00001.parquet``, ...), a
  ``hf download --local-dir`` copy, or any folder of Parquet/JSONL/CSV files (splits from the
  file names, or ``corpus.data_files``);
- a builder name (``json``, ``parquet``, ``csv``) with ``corpus.data_files`` (a file, a list,
  or ``{split: files}``);
- a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, detected by its
  ``state.json`` / ``dataset_dict.json`` and read with :func:`datasets.load_from_disk`.

A hub id resolves the ``datasets`` way (its own cache under ``HF_DATASETS_CACHE``; with
``HF_HUB_OFFLINE=1`` only what is cached). When ``datasets`` cannot reach the hub, a snapshot
of the dataset repository in the Hugging Face hub cache (``HF_HUB_CACHE``, as ``hf download
<id> --repo-type dataset`` leaves it) is read as a local folder. A hub dataset in neither cache
fails with one line naming ``corpus.dataset`` and the command that downloads it.

Nothing here imports ``datasets`` at import time: the Snakefile calls
:func:`local_dataset_files` while it plans.
"""

from __future__ import annotations

import glob
import logging
import shlex
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline_lib.io.guard import visible_files
from pipeline_lib.settings.sections import CorpusSettings

log = logging.getLogger("pipeline")

# What Dataset.save_to_disk / DatasetDict.save_to_disk write (datasets.config's
# DATASET_STATE_JSON_FILENAME and DATASETDICT_JSON_FILENAME).
_SAVED_MARKERS = ("state.json", "dataset_dict.json")


class DatasetSourceError(ValueError):
    """``corpus.dataset`` cannot be read (one line naming the config key and the dataset)."""


def is_saved_dataset(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by ``save_to_disk`` (a Dataset or a DatasetDict)."""
    path = Path(path)
    return path.is_dir() and any((path / m).is_file() for m in _SAVED_MARKERS)


def describe_source(cfg: CorpusSettings, split: str) -> str:
    """How messages name one split of ``corpus.dataset``, e.g. ``corpus.dataset 'org/x'
    (config 'c', split 'train')``."""
    parts = [f"config {cfg.dataset_config!r}"] if cfg.dataset_config else []
    if cfg.data_files is not None:
        parts.append(f"data_files {cfg.data_files!r}")
    parts.append(f"split {split!r}")
    return f"corpus.dataset {cfg.dataset!r} ({', '.join(parts)})"


def load_split(cfg: CorpusSettings, split: str, key: str = "corpus.split"):
    """Split ``split`` of ``corpus.dataset`` as a :class:`datasets.Dataset`.

    ``key`` is the config key that names the split (``corpus.split`` or ``corpus.test_split``),
    for errors. Raises :class:`DatasetSourceError` (one line) for a dataset, configuration or
    split that does not exist, or a hub dataset that is not cached while offline.
    """
    import datasets

    if cfg.dataset is None:
        raise DatasetSourceError(f"config key {key}: corpus.dataset is null")
    datasets.disable_progress_bars()
    where = describe_source(cfg, split)
    if is_saved_dataset(cfg.dataset):
        return _load_saved(cfg.dataset, split, key, where)
    kwargs: dict[str, Any] = {"name": cfg.dataset_config, "data_files": _data_files(cfg.data_files),
                              "split": split}
    if is_local_source(cfg.dataset, cfg.data_files):
        return _load_fresh(cfg.dataset, kwargs, where, key)
    if cfg.data_files is not None:
        return _load_hub_files(cfg, kwargs, where, key)
    if cfg.revision is not None:
        kwargs["revision"] = cfg.revision
    try:
        return datasets.load_dataset(cfg.dataset, **kwargs)
    except ConnectionError as exc:  # the hub is unreachable (or offline) and datasets has no copy
        snapshot = cached_snapshot(cfg.dataset, cfg.revision)
        if snapshot is None:
            raise DatasetSourceError(_not_cached(cfg, exc)) from None
        log.info("%s: read from the hub cache snapshot %s", where, snapshot)
        kwargs.pop("revision", None)
        return _load_fresh(snapshot, kwargs, where, key)
    except Exception as exc:  # noqa: BLE001 - reported in one line with the dataset
        raise DatasetSourceError(_explain(exc, where, key)) from exc


def is_local_source(dataset: str, data_files: Any = None) -> bool:
    """Whether ``corpus.dataset`` reads local files: a local path, or a builder name (a name
    without ``/``: json, parquet, csv, ...) with ``data_files``."""
    return Path(dataset).exists() or ("/" not in dataset and data_files is not None)


def _load_fresh(path: str, kwargs: Mapping[str, Any], where: str, key: str):
    """load_dataset(path) prepared afresh in a temporary cache and held in memory: datasets'
    cache of a local folder is keyed by the folder's name and its card, not its files' contents
    (datasets 5: a folder with a ``configs:`` card reads stale data after an edit)."""
    import datasets

    with tempfile.TemporaryDirectory(prefix="bon-dataset-") as tmp:
        try:
            return datasets.load_dataset(path, cache_dir=tmp, keep_in_memory=True, **kwargs)
        except Exception as exc:  # noqa: BLE001 - reported in one line with the dataset
            raise DatasetSourceError(_explain(exc, where, key)) from exc


# load_dataset's packaged builder for each data file extension
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv",
             ".tsv": "csv", ".txt": "text", ".arrow": "arrow"}


def _load_hub_files(cfg: CorpusSettings, kwargs: Mapping[str, Any], where: str, key: str):
    """``corpus.data_files`` of hub dataset ``corpus.dataset``: those files of the repository
    (from the hub cache, or downloaded), read with the builder of their extension. The
    repository's loading script, if it has one, is not run (``datasets`` no longer runs
    scripts; e.g. ``tatsu-lab/alpaca_eval`` is read as ``data_files: alpaca_eval.json``)."""
    from huggingface_hub import snapshot_download

    patterns = _flat(cfg.data_files)
    kinds = {_BUILDERS.get(Path(p).suffix.lower()) for p in patterns}
    if len(kinds) != 1 or None in kinds:
        raise DatasetSourceError(
            f"{where}: config key corpus.data_files: {patterns} must all end in one of "
            f"{sorted(_BUILDERS)} (the builder is chosen by the extension)")
    try:
        root = snapshot_download(cfg.dataset, repo_type="dataset", revision=cfg.revision,
                                 allow_patterns=patterns)
    except Exception as exc:  # noqa: BLE001 - not cached offline, unknown repo, no network
        raise DatasetSourceError(_not_cached(cfg, exc)) from None
    files = _rebase(cfg.data_files, root)
    missing = [p for p in _flat(files) if not glob.glob(p)]
    if missing:
        raise DatasetSourceError(f"{where}: config key corpus.data_files: no file "
                                 f"{Path(missing[0]).relative_to(root)} in the repository "
                                 f"snapshot {root}")
    return _load_fresh(kinds.pop(), {**kwargs, "name": None, "data_files": files}, where, key)


def _rebase(value: Any, root: str) -> Any:
    """``data_files`` (a path, a list or ``{split: paths}``) relative to folder ``root``."""
    if isinstance(value, Mapping):
        return {k: _rebase(v, root) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [str(Path(root) / str(v)) for v in value]
    return str(Path(root) / str(value))


def _load_saved(path: str, split: str, key: str, where: str):
    import datasets

    try:
        obj = datasets.load_from_disk(path)
    except Exception as exc:  # noqa: BLE001
        raise DatasetSourceError(f"{where}: cannot read the save_to_disk folder: "
                                 f"{_one_line(exc)}") from exc
    if isinstance(obj, datasets.DatasetDict):
        if split not in obj:
            raise DatasetSourceError(f"{where}: config key {key}: no split {split!r}; the "
                                     f"save_to_disk folder has splits {sorted(obj)}")
        return obj[split]
    if key != "corpus.split":
        raise DatasetSourceError(f"{where}: config key {key}: the save_to_disk folder holds one "
                                 "Dataset, not a DatasetDict with splits; set it to null")
    return obj


def cached_snapshot(repo_id: str, revision: str | None = None) -> str | None:
    """The local folder of dataset ``repo_id`` (at ``revision``) in the hub cache, or None."""
    if Path(repo_id).exists() or repo_id.count("/") > 1:
        return None
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, repo_type="dataset", revision=revision,
                                 local_files_only=True)
    except Exception:  # noqa: BLE001 - any miss (not cached, bad id) means "not in the cache"
        return None


def hf_download_command(repo_id: str, revision: str | None = None,
                        repo_type: str | None = None) -> str:
    """The shell command (huggingface_hub's ``hf`` CLI) that puts a hub repo into the cache."""
    cmd = ["hf", "download", repo_id]
    if repo_type:
        cmd += ["--repo-type", repo_type]
    if revision:
        cmd += ["--revision", revision]
    return shlex.join(cmd)


def download_command(cfg: CorpusSettings) -> str:
    """The command that puts hub dataset ``corpus.dataset`` into the hub cache."""
    return hf_download_command(cfg.dataset, cfg.revision, "dataset")


def _not_cached(cfg: CorpusSettings, exc: BaseException) -> str:
    return (f"config key corpus.dataset: {cfg.dataset!r} is not a local folder, nor a hub "
            f"dataset in the Hugging Face cache, and the hub cannot be reached "
            f"({_one_line(exc)}); download it where there is network access: "
            f"{download_command(cfg)} (or run once online without HF_HUB_OFFLINE)")


def _explain(exc: BaseException, where: str, key: str) -> str:
    msg = _one_line(exc)
    if "Unknown split" in msg or ("split" in msg.lower() and "not found" in msg.lower()):
        return f"{where}: config key {key}: {msg}"
    if "BuilderConfig" in msg or "config name" in msg.lower():
        return f"{where}: config key corpus.dataset_config: {msg}"
    if isinstance(exc, FileNotFoundError) or type(exc).__name__ in ("DatasetNotFoundError",
                                                                     "DataFilesNotFoundError"):
        return f"{where}: config key corpus.dataset: not found: {msg}"
    return f"{where}: cannot load: {type(exc).__name__}: {msg}"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _data_files(value: Any) -> Any:
    """``corpus.data_files`` as load_dataset takes it (tuples from the settings as lists)."""
    if isinstance(value, Mapping):
        return {k: _data_files(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return value


def local_dataset_files(dataset: str | None, data_files: Any = None) -> list[str]:
    """The local files ``corpus.dataset`` reads (a job's inputs, so editing one reruns it):
    every non-hidden file of a local folder; for a builder name (a name without ``/`` that is
    no local path: json, parquet, csv, ...) the paths of ``data_files`` (a glob expanded over
    the files that exist, a plain path as it is, so a file another rule writes is waited for).
    A hub id has none: its ``data_files`` are paths inside the repository. Imports nothing
    heavy (the Snakefile calls it while planning)."""
    if dataset is None:
        return []
    root = Path(dataset)
    if root.is_dir():
        return [str(p) for p in visible_files(root)]
    if not is_local_source(dataset, data_files):
        return []
    out: set[str] = set()
    for pattern in _flat(data_files):
        if any(c in pattern for c in "*?["):
            out.update(p for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        elif "://" not in pattern:
            out.add(pattern)
    return sorted(out)


def _flat(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, Mapping):
        return [p for v in value.values() for p in _flat(v)]
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [str(value)]
