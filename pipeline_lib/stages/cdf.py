"""Stage ``cdf``: per prompt, the sorted proxy rewards under the ensemble objective (+ curve fit)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import polars as pl

from pipeline_lib.io.atomic import PathLike
from pipeline_lib.io.tables import read_polars, read_table, write_table
from pipeline_lib.math.cdf import fit_log_cdf, group_sorted_matrix
from pipeline_lib.settings.sections import Settings
from pipeline_lib.stages.common import StageError, provenance
from pipeline_lib.stages.reward_cache import check_complete, ensemble_rewards

log = logging.getLogger("pipeline")


def run_cdf(
    config: Settings | Mapping[str, Any], split: str, rewards_path: PathLike, samples_path: PathLike,
    out: PathLike, norm_reference: PathLike | None = None,
) -> None:
    """Per prompt: the M proxy rewards under the ensemble objective, sorted (+ curvefit)."""
    s = Settings.from_config(config)
    strategies = read_table(samples_path, "samples").column("strategy").unique().to_pylist()
    if strategies != ["random"]:
        raise StageError(
            f"{samples_path}: sampling strategy {strategies} is not i.i.d. sampling from pi_ref; "
            "reward CDFs (and vBoN) need a 'random' reference cache"
        )
    rewards = read_polars(rewards_path, "rewards")
    cfg = s.cdf
    ref = read_polars(norm_reference, "rewards") if norm_reference else None
    proxy = ensemble_rewards(rewards, cfg, str(rewards_path), ref)
    m = s.sampling.M.of(split)
    prompt_ids = sorted(proxy["prompt_id"].unique().to_list())
    check_complete(proxy, prompt_ids, m, str(rewards_path))
    codes = proxy["prompt_id"].cast(pl.Enum(prompt_ids)).to_physical().to_numpy()
    sorted_m = group_sorted_matrix(codes, proxy["proxy"].to_numpy(), len(prompt_ids), m)
    fits = [fit_log_cdf(row) for row in sorted_m] if cfg.curvefit else []
    if fits:
        n_bad = sum(not f.ok for f in fits)
        log.info("curvefit: %d/%d prompts fell back to the empirical CDF; median rmse %.4f",
                 n_bad, len(fits), float(np.nanmedian([f.rmse for f in fits])))
    nan = [None] * len(prompt_ids)
    table = pl.DataFrame(
        {
            "prompt_id": prompt_ids,
            "objective": [cfg.objective] * len(prompt_ids),
            "n_samples": [m] * len(prompt_ids),
            "sorted_rewards": list(sorted_m),
            "fit_a": [f.a if f.ok else None for f in fits] or nan,
            "fit_b": [f.b if f.ok else None for f in fits] or nan,
            "fit_c": [f.c if f.ok else None for f in fits] or nan,
            "fit_rmse": [f.rmse if f.ok else None for f in fits] or nan,
            "fit_ok": [f.ok for f in fits] or [False] * len(prompt_ids),
        },
        schema_overrides={k: pl.Float64 for k in ("fit_a", "fit_b", "fit_c", "fit_rmse")}
        | {"sorted_rewards": pl.List(pl.Float64), "n_samples": pl.Int32},
    )
    write_table(table, out, "cdf", provenance(
        s, "cdf", split=split, objective=cfg.objective, uwo_lambda=cfg.uwo_lambda,
        normalize=cfg.normalize, curvefit=cfg.curvefit, M=m))
