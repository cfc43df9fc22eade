"""Stage ``pairs``: best and worst of the first n cached samples per prompt."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from pipeline_lib.io.atomic import PathLike
from pipeline_lib.io.tables import read_polars, write_table
from pipeline_lib.settings.sections import Settings
from pipeline_lib.stages.common import StageError, provenance
from pipeline_lib.stages.reward_cache import ensemble_rewards
from pipeline_lib.train.pairs import bon_pairs

log = logging.getLogger("pipeline")


def run_pairs(
    config: Settings | Mapping[str, Any], n: int, samples_path: PathLike, rewards_path: PathLike,
    out: PathLike,
) -> None:
    """Best and worst of the first n cached samples per prompt, by the ensemble proxy."""
    s = Settings.from_config(config)

    samples = read_polars(samples_path, "samples")
    for col in ("ref_logprob", "response_token_ids", "response"):
        if samples[col].null_count():  # an imported cache (reference_cache.source: import)
            raise StageError(f"{samples_path}: samples column {col!r} is null (an imported "
                             "cache has no reference log-probs or token ids); best/worst-of-n "
                             "pairs for dpo, ipo, bonbon, bon_sft and bond need it")
    proxy = ensemble_rewards(read_polars(rewards_path, "rewards"), s.cdf,
                             str(rewards_path))
    pairs, dropped = bon_pairs(samples, proxy, n, return_dropped=True)
    log.info("bon%d pairs: %d prompts, %d dropped (all n proxies tied)", n, pairs.height,
             len(dropped))
    write_table(pairs, out, "pairs", provenance(s, "pairs", n=n,
                                                objective=s.cdf.objective))
