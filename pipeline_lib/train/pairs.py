"""Best-of-n / worst-of-n pairs from the reward cache: the training data of DPO, IPO, BoNBoN,
BoN-SFT and BOND's forward term."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from pipeline_lib.models.encoding import encode_prompt

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
    s, p, order = _checked_inputs(samples, proxy, n)
    first = _first_n_with_proxy(s, p, n)
    best = _pick(first, "best", proxy_desc=True, idx_desc=False)
    worst = _pick(first, "worst", proxy_desc=False, idx_desc=True)
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


def _checked_inputs(samples: pl.DataFrame, proxy: pl.DataFrame, n: int
                    ) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """The samples and proxy columns :func:`bon_pairs` uses, and each prompt's first row (its
    order); refuses duplicates and prompts with fewer than ``n`` samples."""
    require_columns(samples, _SAMPLE_COLUMNS, "samples")
    require_columns(proxy, _PROXY_COLUMNS, "proxy")
    s = samples.select(_SAMPLE_COLUMNS)
    p = proxy.select(_PROXY_COLUMNS).with_columns(pl.col("proxy").cast(pl.Float64))
    for frame, what in ((s, "samples"), (p, "proxy")):
        dup = _first_duplicate(frame, ["prompt_id", "sample_idx"])
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
    return s, p, order


def _first_n_with_proxy(s: pl.DataFrame, p: pl.DataFrame, n: int) -> pl.DataFrame:
    """Each prompt's first ``n`` samples by sample_idx with their proxy rewards; refuses a
    missing proxy and a non-finite proxy or reference log-prob."""
    key = ["prompt_id", "sample_idx"]
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
    return first


def _pick(first: pl.DataFrame, prefix: str, proxy_desc: bool, idx_desc: bool) -> pl.DataFrame:
    """Per prompt the sample first in (proxy, sample_idx) order, as ``<prefix>_*`` columns."""
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


def max_positions(model) -> int | None:
    """The longest sequence the model accepts (None when its config does not say)."""
    config = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@dataclass
class EncodedPairs:
    """Pairs as token ids (prompt, chosen, rejected) with their cached reference log-probs."""

    prompt_ids: list[list[int]]
    chosen_ids: list[list[int]]
    rejected_ids: list[list[int]]
    ref_chosen: np.ndarray
    ref_rejected: np.ndarray


def encode_pairs(pairs: pl.DataFrame, tokenizer, max_positions: int | None) -> EncodedPairs:
    """Encode a pairs table for the preference trainer; refuses empty or too-long responses
    and non-finite reference log-probs, naming the prompt."""
    need = ("prompt", "best_token_ids", "worst_token_ids", "best_ref_logprob",
            "worst_ref_logprob")
    require_columns(pairs, need, "pairs")
    if pairs.height == 0:
        raise ValueError("pairs is empty: nothing to train on")
    ids_of = (pairs["prompt_id"].to_list() if "prompt_id" in pairs.columns
              else [str(i) for i in range(pairs.height)])
    prompts = pairs["prompt"].to_list()
    cache: dict[str, list[int]] = {}
    prompt_ids = []
    for text in prompts:
        if text not in cache:
            cache[text] = encode_prompt(tokenizer, text)
        prompt_ids.append(cache[text])
    chosen = [list(map(int, r)) for r in pairs["best_token_ids"].to_list()]
    rejected = [list(map(int, r)) for r in pairs["worst_token_ids"].to_list()]
    ref_c = np.array(pairs["best_ref_logprob"].cast(pl.Float64).to_numpy(), dtype=np.float64)
    ref_r = np.array(pairs["worst_ref_logprob"].cast(pl.Float64).to_numpy(), dtype=np.float64)
    for i, pid in enumerate(ids_of):
        for what, resp in (("best", chosen[i]), ("worst", rejected[i])):
            if not resp:
                raise ValueError(f"pair for prompt {pid!r} has an empty {what} response")
            if max_positions is not None and len(prompt_ids[i]) + len(resp) > max_positions:
                raise ValueError(
                    f"pair for prompt {pid!r}: prompt + {what} response is "
                    f"{len(prompt_ids[i]) + len(resp)} tokens, longer than the policy's "
                    f"{max_positions} positions (log-probs would not match the cache)"
                )
        if not (np.isfinite(ref_c[i]) and np.isfinite(ref_r[i])):
            raise ValueError(f"pair for prompt {pid!r} has a non-finite reference log-prob")
    return EncodedPairs(prompt_ids, chosen, rejected, ref_c, ref_r)
