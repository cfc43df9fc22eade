"""Models named in the config, resolved the normal Hugging Face way.

A name is a local model directory (a folder with ``config.json``, used as it is) or a hub repo
id with an optional revision (branch, tag or commit), looked up in the Hugging Face cache
(``HF_HOME`` / ``HF_HUB_CACHE``) with ``huggingface_hub.snapshot_download``. When the snapshot
is not cached it is downloaded (only the files a transformers model needs), unless
``HF_HUB_OFFLINE`` is set: then :class:`ModelNotFoundError` says in one line which config key
names the model and the command that downloads it.

Every resolution is cached for the process, and recorded (:func:`loaded_models`) with its
snapshot, the hub commit hash or a local directory's content fingerprint, for provenance.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline_lib.io.datasets import hf_download_command
from pipeline_lib.io.guard import visible_files
from pipeline_lib.settings.config import is_hub_id, looks_like_path
from pipeline_lib.settings.sections import ModelRef

log = logging.getLogger("pipeline")

# The files a transformers model needs (top-level files only): configs, weights, tokenizer
# files (tokenizer.json, vocab/merges .txt, sentencepiece .model, tiktoken), chat templates.
MODEL_FILE_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja")


class ModelNotFoundError(ValueError):
    """A model named in the config cannot be found (message: one line naming the key)."""


@dataclass(frozen=True)
class ResolvedModel:
    """A model ready to load: ``path`` (a directory with ``config.json``: the hub snapshot or
    the local directory), ``snapshot`` (the hub commit hash, or ``sha256:<16 hex>`` of a local
    directory's files) and the ``ref`` it was resolved from."""

    path: Path
    snapshot: str
    ref: ModelRef

    @property
    def is_local(self) -> bool:
        """Whether the config named a local directory (not a hub id)."""
        return self.snapshot.startswith("sha256:")


_RESOLVED: dict[tuple, ResolvedModel] = {}
_FINGERPRINTS: dict[tuple, str] = {}
_LOADED: dict[str, dict[str, Any]] = {}


def clear_model_caches() -> None:
    """Forget every resolution and the :func:`loaded_models` registry (tests)."""
    _RESOLVED.clear()
    _FINGERPRINTS.clear()
    _LOADED.clear()


def loaded_models() -> dict[str, dict[str, Any]]:
    """Every model resolved (or loaded) in this process so far: config key -> {name, revision,
    snapshot}; a second model under the same key is recorded as ``key[2]``, and so on."""
    return {k: dict(v) for k, v in _LOADED.items()}


def _record(resolved: ResolvedModel) -> None:
    ref = resolved.ref
    entry = {"name": ref.name, "revision": ref.revision, "snapshot": resolved.snapshot}
    key, n = ref.key, 1
    while key in _LOADED and _LOADED[key] != entry:
        n += 1
        key = f"{ref.key}[{n}]"
    _LOADED[key] = entry


def _file_sha256(path: Path) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.digest()


def directory_fingerprint(path: str | Path) -> str:
    """``sha256:<16 hex>`` of a directory's files (relative names and contents; hidden files
    left out). Cached for the process while no file's size or mtime changes."""
    root = Path(path).resolve()
    files = visible_files(root)
    stats = tuple((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in files)
    key = (str(root), stats)
    if key not in _FINGERPRINTS:
        digest = hashlib.sha256()
        for p in files:
            digest.update(str(p.relative_to(root)).encode() + b"\0")
            digest.update(_file_sha256(p))
        _FINGERPRINTS[key] = f"sha256:{digest.hexdigest()[:16]}"
    return _FINGERPRINTS[key]


def download_command(ref: ModelRef) -> str:
    """The shell command (huggingface_hub's ``hf`` CLI) that downloads ``ref`` into the cache."""
    return hf_download_command(ref.name, ref.revision)


def download_patterns(files: Iterable[str], trust_remote_code: bool = False) -> list[str]:
    """The files of a hub repo to download: top-level configs, tokenizer files, chat templates
    and safetensors weights (``*.bin`` only when there are no safetensors; ``*.py`` only with
    ``trust_remote_code``). Exact names, for ``snapshot_download(allow_patterns=...)``."""
    import fnmatch

    top = [f for f in files if "/" not in f]
    patterns = list(MODEL_FILE_PATTERNS)
    if not any(f.endswith(".safetensors") for f in top):
        patterns.append("*.bin")
    if trust_remote_code:
        patterns.append("*.py")
    return sorted(f for f in top if any(fnmatch.fnmatch(f, p) for p in patterns))


def _local(ref: ModelRef) -> ResolvedModel | None:
    path = Path(ref.name).expanduser()
    if not path.is_dir():
        return None
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"config key {ref.key}: {ref.name!r} is a directory but not a "
                                 "Hugging Face model directory (no config.json)")
    if ref.revision is not None:
        raise ModelNotFoundError(f"config key {ref.key}: revision {ref.revision!r} is set but "
                                 f"{ref.name!r} is a local directory (revisions are for hub ids)")
    return ResolvedModel(path, directory_fingerprint(path), ref)


def _from_hub(ref: ModelRef) -> ResolvedModel:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    revision = ref.revision or "main"
    where = f"config key {ref.key}: hub model {ref.name!r} (revision {revision!r})"
    try:
        # only config.json is required of a cached snapshot: a snapshot downloaded with other
        # allow_patterns must not read as incomplete
        path = snapshot_download(ref.name, revision=ref.revision, local_files_only=True,
                                 allow_patterns=["config.json"])
    except LocalEntryNotFoundError:
        if constants.is_offline_mode():
            raise ModelNotFoundError(
                f"{where} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                f"HF_HUB_OFFLINE is set; download it with: {download_command(ref)}") from None
        path = _download(ref, where)
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{where}: the cached snapshot {path} has no config.json; "
                                 f"download it again with: {download_command(ref)}")
    return ResolvedModel(path, path.name, ref)


def _download(ref: ModelRef, where: str) -> str:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        files = HfApi().list_repo_files(ref.name, revision=ref.revision)
        patterns = download_patterns(files, ref.trust_remote_code)
        log.info("downloading %s (%s): %s", ref.name, ref.revision or "main", ", ".join(patterns))
        return snapshot_download(ref.name, revision=ref.revision, allow_patterns=patterns)
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotFoundError(f"{where} could not be downloaded ({reason}); download it "
                                 f"with: {download_command(ref)}") from exc


def resolve_model(ref: ModelRef) -> ResolvedModel:
    """The local directory of a model named in the config (see the module docstring) and its
    snapshot, recorded in :func:`loaded_models`; hub resolutions are cached for the process.
    Raises :class:`ModelNotFoundError` (one line naming ``ref.key``) when it cannot be found."""
    from huggingface_hub import constants

    resolved = _local(ref)
    if resolved is None:
        if looks_like_path(ref.name):
            raise ModelNotFoundError(
                f"config key {ref.key}: local model directory {ref.name!r} does not exist (or "
                "has no config.json)")
        if not is_hub_id(ref.name):
            raise ModelNotFoundError(
                f"config key {ref.key}: {ref.name!r} is neither a local model directory (with "
                "config.json) nor a Hugging Face hub id (name or org/name)")
        cache_key = (ref, constants.HF_HUB_CACHE)
        if cache_key not in _RESOLVED:
            _RESOLVED[cache_key] = _from_hub(ref)
        resolved = _RESOLVED[cache_key]
    _record(resolved)
    return resolved


def as_model_ref(source: ModelRef | str | Path, key: str) -> ModelRef:
    """A loader's argument as a :class:`ModelRef`: a ref as it is; a path or name (a local
    directory, or a hub id at its default revision, no remote code) named by ``key``."""
    if isinstance(source, ModelRef):
        return source
    return ModelRef(str(source), None, False, key)


def _blob_name(path: Path) -> str:
    """The blob name the hub uses: the LFS sha256 for weights, the git blob sha1 otherwise."""
    data = path.read_bytes()
    if path.suffix in (".safetensors", ".bin", ".model"):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def add_to_cache(cache: str | Path, repo_id: str, model_dir: str | Path,
                 refs: Iterable[str] = ("main",), commit: str | None = None) -> str:
    """Place the files of ``model_dir`` in the hub cache ``cache`` as commit ``commit`` (default:
    derived from the repo id and the files) of model repo ``repo_id``, with ``refs`` (branches
    or tags) pointing at it. Returns the commit hash."""
    src = Path(model_dir)
    files = sorted(p for p in src.rglob("*") if p.is_file())
    if commit is None:
        digest = hashlib.sha1(repo_id.encode())
        for p in files:
            digest.update(str(p.relative_to(src)).encode() + _blob_name(p).encode())
        commit = digest.hexdigest()
    repo = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    snapshot = repo / "snapshots" / commit
    for p in files:
        rel = p.relative_to(src)
        blob = repo / "blobs" / _blob_name(p)
        if not blob.exists():
            shutil.copyfile(p, blob)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        try:
            link.symlink_to(os.path.relpath(blob, link.parent))
        except OSError:  # no symlinks on this file system: huggingface_hub copies too
            shutil.copyfile(blob, link)
    for ref in refs:
        ref_file = repo / "refs" / ref
        ref_file.parent.mkdir(parents=True, exist_ok=True)
        ref_file.write_text(commit)  # no newline, as huggingface_hub writes it
    return commit


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline_lib.models.hub add DIR ORG/NAME``: place a model directory in the
    Hugging Face cache under a hub id (e.g. on a machine without network, a model copied from
    elsewhere), so that a config can name it by that id with ``HF_HUB_OFFLINE=1``."""
    from huggingface_hub import constants

    parser = argparse.ArgumentParser(prog="python -m pipeline_lib.models.hub")
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="place a local model directory in the HF cache")
    add.add_argument("model_dir")
    add.add_argument("repo_id")
    add.add_argument("--ref", action="append", default=None,
                     help="branch or tag pointing at it (default main; repeatable)")
    add.add_argument("--cache", default=None, help="hub cache (default: HF_HUB_CACHE)")
    args = parser.parse_args(argv)
    if not (Path(args.model_dir) / "config.json").exists():
        print(f"{args.model_dir}: not a model directory (no config.json)", file=sys.stderr)
        return 1
    if not is_hub_id(args.repo_id):
        print(f"{args.repo_id!r} is not a hub id (name or org/name)", file=sys.stderr)
        return 1
    cache = args.cache or constants.HF_HUB_CACHE
    commit = add_to_cache(cache, args.repo_id, args.model_dir, refs=args.ref or ("main",))
    print(f"{args.repo_id} at {commit} in {cache}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
