"""Stage ``import_cache``: a published reward cache file as a split's ``samples`` and ``rewards``
tables (config ``reference_cache.source: import``), in place of sample, gather and score."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline_lib.io.reference_cache import import_cache, read_cache_file
from pipeline_lib.io.tables import write_table
from pipeline_lib.settings.sections import Settings, as_dict
from pipeline_lib.stages.common import PathLike, StageError, provenance

log = logging.getLogger("pipeline")


def run_import_cache(config: Settings | Mapping[str, Any], split: str, source: PathLike,
                     samples_out: PathLike, rewards_out: PathLike) -> None:
    """Read ``source`` (format ``reference_cache.format``) into ``samples_out`` and
    ``rewards_out``, M = ``sampling.M[split]`` samples per prompt (the first M of each)."""
    s = Settings.from_config(config)
    cfg = s.reference_cache
    if not cfg.imported:
        raise StageError("reference_cache.source is 'generate': rule import_cache has nothing "
                         "to import")
    m = s.sampling.M.of(split)
    path = Path(source).expanduser().resolve()
    cache = import_cache(read_cache_file(path), cfg, split, m, where=str(source))
    if cache.truncated:
        log.info("%s: %d of %d prompts have more than M=%d samples; their first %d are kept",
                 source, cache.truncated, cache.n_prompts, m, m)
    log.info("%s: %d prompts x %d samples, scorers %s", source, cache.n_prompts, m,
             sorted(set(cache.rewards["scorer"])))
    prov = provenance(s, "import_cache", split=split, M=m, source=str(path),
                      source_bytes=path.stat().st_size if path.is_file() else None,
                      reference_cache=as_dict(cfg))
    write_table(cache.samples, samples_out, "samples", prov)
    write_table(cache.rewards, rewards_out, "rewards", prov)
