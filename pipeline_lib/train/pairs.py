"""Best-of-n / worst-of-n pairs from the reward cache: the training data of DPO, IPO, BoNBoN,
BoN-SFT and BOND's forward term."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import polars as pl

log = logging.getLogger(__name__)


PAIR_COLUMNS = (
    "prompt_id",
    "n",
    "prompt",
    "best_idx",
    "worst_idx",
    "best_response",
    "worst_response",
    "best_token_ids",
    "worst_token_ids",
    "best_proxy",
    "worst_proxy",
    "best_ref_logprob",
    "worst_ref_logprob",
)


_SAMPLE_COLUMNS = ("prompt_id", "sample_idx", "prompt", "response", "response_token_ids",
                   "ref_logprob")


_PROXY_COLUMNS = ("prompt_id", "sample_idx", "proxy")


def require_columns(df: pl.DataFrame, cols: Sequence[str], what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"{what} frame lacks column(s) {missing}; has {df.columns}")


def _first_duplicate(df: pl.DataFrame, keys: list[str]) -> dict | None:
    dup = df.group_by(keys).len().filter(pl.col("len") > 1)
    return dup.row(0, named=True) if dup.height else None


def bon_pairs(
    samples: pl.DataFrame,
    proxy: pl.DataFrame,
    n: int,
    *,
    return_dropped: bool = False,
) -> pl.DataFrame | tuple[pl.DataFrame, list[str]]:
    """(best-of-n, worst-of-n) pairs per prompt from the first ``n`` cached samples.

    For every prompt the first ``n`` samples *by sample_idx* are used (BoNBoN's sampler takes the
    first k of one shared pool for every n, so the pair sets are nested across n). Among them:

    * best  = the highest proxy reward; ties go to the *smallest* sample_idx;
    * worst = the lowest proxy reward; ties go to the *largest* sample_idx.

    A prompt whose ``n`` proxies are all equal has no preference (best would equal worst); it is
    dropped, with a warning on the module logger naming how many prompts were dropped.

    Args:
        samples: columns prompt_id, sample_idx, prompt, response, response_token_ids (list[int]),
            ref_logprob (float; summed log pi_ref of the response incl. EOS).
        proxy: columns prompt_id, sample_idx, proxy (float; the ensemble proxy reward).
        n: BoN size, an integer >= 2.
        return_dropped: also return the list of dropped (all-tied) prompt ids.

    Returns:
        One row per kept prompt, in order of first appearance in ``samples``, with the columns
        :data:`PAIR_COLUMNS`; or ``(pairs, dropped_prompt_ids)`` when ``return_dropped``.

    Raises:
        ValueError: ``n`` < 2, missing columns, duplicate (prompt_id, sample_idx) rows, a prompt
            with fewer than ``n`` samples, a sample without a proxy reward, or a non-finite proxy
            or reference log-prob among the samples used (each message names the prompt).
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise ValueError(f"n must be an integer >= 2, got {n!r}")
    n = int(n)
    require_columns(samples, _SAMPLE_COLUMNS, "samples")
    require_columns(proxy, _PROXY_COLUMNS, "proxy")
    s = samples.select(_SAMPLE_COLUMNS)
    p = proxy.select(_PROXY_COLUMNS).with_columns(pl.col("proxy").cast(pl.Float64))
    key = ["prompt_id", "sample_idx"]
    for frame, what in ((s, "samples"), (p, "proxy")):
        dup = _first_duplicate(frame, key)
        if dup is not None:
            raise ValueError(
                f"{what} has {dup['len']} rows for prompt {dup['prompt_id']!r}, "
                f"sample_idx {dup['sample_idx']}"
            )

    order = (s.select("prompt_id").with_row_index("_row").group_by("prompt_id")
             .agg(pl.col("_row").min().alias("_order")))
    counts = s.group_by("prompt_id").len()
    short = counts.filter(pl.col("len") < n).join(order, on="prompt_id").sort("_order")
    if short.height:
        row = short.row(0, named=True)
        raise ValueError(
            f"prompt {row['prompt_id']!r} has {row['len']} cached samples, fewer than n = {n}"
            + (f" ({short.height} prompts are short)" if short.height > 1 else "")
        )

    first = (
        s.sort(key)
        .with_columns(pl.int_range(pl.len()).over("prompt_id").alias("_rank"))
        .filter(pl.col("_rank") < n)
        .drop("_rank")
        .join(p, on=key, how="left")
    )
    missing = first.filter(pl.col("proxy").is_null())
    if missing.height:
        row = missing.row(0, named=True)
        raise ValueError(
            f"prompt {row['prompt_id']!r} sample_idx {row['sample_idx']} has no proxy reward"
        )
    for col in ("proxy", "ref_logprob"):
        bad = first.filter(~pl.col(col).cast(pl.Float64).is_finite())
        if bad.height:
            row = bad.row(0, named=True)
            raise ValueError(
                f"prompt {row['prompt_id']!r} sample_idx {row['sample_idx']} has a non-finite "
                f"{col} ({row[col]!r})"
            )

    def pick(prefix: str, proxy_desc: bool, idx_desc: bool) -> pl.DataFrame:
        chosen = (
            first.sort(["prompt_id", "proxy", "sample_idx"],
                       descending=[False, proxy_desc, idx_desc])
            .group_by("prompt_id", maintain_order=True)
            .first()
        )
        return chosen.select(
            "prompt_id",
            *([pl.col("prompt")] if prefix == "best" else []),
            pl.col("sample_idx").alias(f"{prefix}_idx"),
            pl.col("response").alias(f"{prefix}_response"),
            pl.col("response_token_ids").alias(f"{prefix}_token_ids"),
            pl.col("proxy").alias(f"{prefix}_proxy"),
            pl.col("ref_logprob").cast(pl.Float64).alias(f"{prefix}_ref_logprob"),
        )

    best = pick("best", proxy_desc=True, idx_desc=False)
    worst = pick("worst", proxy_desc=False, idx_desc=True)
    pairs = (
        best.join(worst, on="prompt_id")
        .join(order, on="prompt_id")
        .sort("_order")
        .drop("_order")
        .with_columns(pl.lit(n, dtype=pl.Int32).alias("n"))
    )
    tied = pairs.filter(pl.col("best_proxy") == pl.col("worst_proxy"))
    dropped = tied["prompt_id"].to_list()
    if dropped:
        log.warning(
            "bon_pairs(n=%d): dropped %d of %d prompts whose first %d proxy rewards are all "
            "equal (no preference), e.g. %s", n, len(dropped), pairs.height, n, dropped[:5],
        )
        pairs = pairs.filter(pl.col("best_proxy") != pl.col("worst_proxy"))
    pairs = pairs.select(PAIR_COLUMNS)
    return (pairs, dropped) if return_dropped else pairs
