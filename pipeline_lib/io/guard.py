"""The stage-level checkpoint guard: a checkpoint directory is resumed only by a job with the same
settings and the same input files (path, size, mtime); and which files of a directory a job
reads (:func:`visible_files`)."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline_lib.io.atomic import PathLike

log = logging.getLogger("pipeline")


def visible_files(root: PathLike) -> list[Path]:
    """Every file under the directory ``root``, sorted, hidden files and folders (a download
    cache, a lock) left out: what a job reads of a model or dataset folder."""
    root = Path(root)
    return sorted(p for p in root.rglob("*")
                  if p.is_file() and not any(part.startswith(".")
                                             for part in p.relative_to(root).parts))


def input_fingerprint(paths: Sequence[PathLike | None]) -> list[list]:
    """(path, size, mtime_ns) of every file of the inputs (directories walked): an input that
    an upstream job rewrote no longer matches a checkpoint made on the old one."""
    out = []
    for p in (Path(p) for p in paths if p is not None):
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            st = f.stat()
            out.append([str(f), st.st_size, st.st_mtime_ns])
    return out


def checkpoint_guard(checkpoint_dir: Path, settings: Mapping[str, Any],
                      inputs: Sequence[PathLike | None]) -> None:
    """Resume only a checkpoint made by the same settings and inputs; otherwise start afresh
    (the trainers also refuse a checkpoint of another seed, data size or process count)."""
    blob = json.dumps({"settings": settings, "inputs": input_fingerprint(inputs)},
                      sort_keys=True, default=str)
    marker = checkpoint_dir / "run.json"
    if checkpoint_dir.exists() and (not marker.exists() or marker.read_text() != blob):
        log.warning("checkpoint %s belongs to other settings or inputs; starting afresh",
                    checkpoint_dir)
        shutil.rmtree(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(blob)
