"""Stage ``summary``: one table over every policy and BoN point, CSV copies and the figures."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import polars as pl

from pipeline_lib.io.atomic import atomic_file
from pipeline_lib.io.tables import read_polars, write_table
from pipeline_lib.math.winrate import pareto_frontier
from pipeline_lib.settings.sections import Settings
from pipeline_lib.stages.common import PathLike, provenance
from pipeline_lib.stages.figures import plot_bon_curves, plot_kl_gold, plot_win_rates
from pipeline_lib.stages.generate import sampling_columns
from pipeline_lib.stages.reward_cache import configured_objective_name


def summary_table(config: Settings | Mapping[str, Any], evals: Sequence[PathLike],
                  bon_path: PathLike) -> pl.DataFrame:
    """Every policy's summary row plus the BoN points of the configured objective, with the
    (KL, gold) Pareto frontier marked over all of them."""
    s = Settings.from_config(config)
    rows = pl.concat([read_polars(p, "eval_summary") for p in evals])
    bon = read_polars(bon_path, "bon_curve").filter(
        pl.col("objective") == configured_objective_name(s.cdf, s.evaluation.uwo_lambdas))
    bon_rows = bon.select(
        pl.format("bon-n{}", pl.col("n")).alias("policy"), pl.lit("bon").alias("method"),
        (1.0 / (pl.col("n") - 1).cast(pl.Float64)).alias("beta"), pl.col("n"),
        pl.col("gold"), pl.lit(None, pl.Float64).alias("gold_se"), pl.col("proxy"),
        pl.col("kl_analytic").alias("kl"), pl.lit(None, pl.Float64).alias("kl_se"),
        pl.lit("bon_analytic").alias("kl_estimator"), pl.lit(None, pl.Float64).alias("kl_k3"),
        pl.col("win_rate_ref"), pl.lit(None, pl.Float64).alias("win_rate_bon"),
        pl.lit(rows["win_rate_n"][0], pl.Int32).alias("win_rate_n"), pl.lit(False).alias("pareto"),
        # BoN's KL refers to pi_ref at the cache's sampling distribution (generation section)
        *(pl.lit(v).alias(k) for k, v in sampling_columns(s).items()),
    ).with_columns(pl.when(pl.col("n") == 1).then(None).otherwise(pl.col("beta")).alias("beta"))
    table = pl.concat([rows, bon_rows.cast(rows.schema)])
    front = pareto_frontier(table["kl"].to_numpy(), table["gold"].to_numpy())
    return table.with_columns(pl.Series("pareto", front))


def run_summary(config: Settings | Mapping[str, Any], evals: Sequence[PathLike], bon_path: PathLike,
                out: PathLike, figures: Mapping[str, PathLike],
                csv: Mapping[str, PathLike] | None = None) -> None:
    """summary.parquet, CSV copies for the HTML report, and the three figures."""
    s = Settings.from_config(config)
    table = summary_table(s, evals, bon_path)
    write_table(table, out, "eval_summary", provenance(s, "summary"))
    bon = read_polars(bon_path, "bon_curve")
    for frame, path in ((table, (csv or {}).get("summary")), (bon, (csv or {}).get("bon"))):
        if path:
            _write_csv(frame, path)
    plot_bon_curves(bon, figures["bon_curves"])
    plot_kl_gold(table, bon.filter(pl.col("objective") == configured_objective_name(s.cdf, s.evaluation.uwo_lambdas)),
                 figures["kl_gold"])
    plot_win_rates(table, figures["win_rates"])


def _write_csv(frame: pl.DataFrame, path: PathLike) -> None:
    with atomic_file(path) as tmp:
        frame.write_csv(tmp, float_precision=6)
