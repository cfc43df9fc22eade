"""Stage ``summary``: one table over every policy and BoN point, CSV copies and the figures."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import polars as pl

from pipeline_lib.io.atomic import atomic_file
from pipeline_lib.io.schemas import SCHEMAS
from pipeline_lib.io.tables import read_polars, write_table
from pipeline_lib.math.frontier import pareto_flags_se
from pipeline_lib.settings.sections import Settings
from pipeline_lib.stages.budget import BUDGET_COLUMNS, BUDGET_TYPES, bon_budget, run_budget
from pipeline_lib.stages.common import PathLike, StageError, provenance
from pipeline_lib.stages.figures import (
    plot_bon_curves,
    plot_kl_gold,
    plot_kl_win_rate,
    plot_win_rates,
)
from pipeline_lib.stages.generate import sampling_columns
from pipeline_lib.stages.reward_cache import configured_objective_name

PARETO_Z = 1.96  # a row is dominated only beyond this many combined standard errors


def summary_table(config: Settings | Mapping[str, Any], evals: Sequence[PathLike],
                  bon_path: PathLike,
                  train_logs: Mapping[str, PathLike] | None = None) -> pl.DataFrame:
    """Every policy's summary row plus the BoN points of the configured objective, with the
    (KL, gold) Pareto frontier marked over all of them.

    ``evals`` may be empty (an imported reference cache trains no policy): the table then holds
    the BoN points alone. A BoN point's ``win_rate_ref`` and ``win_rate_judges`` come from the
    BoN table (best-of-n of the non-judge samples against the held-out judges, the judges of the
    policies' ``win_rate_ref``); its ``win_rate_n`` is ``evaluation.win_rate_n`` capped at M, as
    in :func:`pipeline_lib.stages.evaluate.run_evaluate`. The budget columns of a run come
    from its training log in ``train_logs`` (run name -> path), a BoN point's from its n
    (:mod:`pipeline_lib.stages.budget`)."""
    s = Settings.from_config(config)
    schema = pl.from_arrow(SCHEMAS["eval_summary"].empty_table()).schema
    rows = pl.concat([read_polars(p, "eval_summary").cast(schema) for p in evals]
                     or [pl.DataFrame(schema=schema)])
    bon = read_polars(bon_path, "bon_curve").filter(
        pl.col("objective") == configured_objective_name(s.cdf, s.evaluation.uwo_lambdas))
    if bon.height == 0:
        raise StageError(f"{bon_path}: no BoN curve of the configured objective "
                         f"{configured_objective_name(s.cdf, s.evaluation.uwo_lambdas)!r}")
    judges = set(bon["win_rate_judges"]) | set(rows["win_rate_judges"])
    if len(judges) != 1:
        raise StageError(f"the win rates of {bon_path} and the policy evaluations are judged "
                         f"by different numbers of held-out samples: {sorted(judges)}; rerun "
                         "them with the same evaluation.win_rate_judges")
    bon_rows = bon.select(
        pl.format("bon-n{}", pl.col("n")).alias("policy"), pl.lit("bon").alias("method"),
        (1.0 / (pl.col("n") - 1).cast(pl.Float64)).alias("beta"), pl.col("n"),
        pl.col("gold"), pl.lit(None, pl.Float64).alias("gold_se"), pl.col("proxy"),
        pl.col("kl_analytic").alias("kl"), pl.lit(None, pl.Float64).alias("kl_se"),
        pl.lit("bon_analytic").alias("kl_estimator"), pl.lit(None, pl.Float64).alias("kl_k3"),
        pl.col("win_rate_ref"), pl.lit(None, pl.Float64).alias("win_rate_bon"),
        pl.min_horizontal(pl.lit(s.evaluation.win_rate_n), pl.col("pool_size"))
        .alias("win_rate_n"),
        pl.col("win_rate_judges"), pl.lit(False).alias("pareto"),
        pl.lit(None, pl.String).alias("sweep"), pl.lit(None, pl.Int32).alias("seed"),
        *(pl.Series(k, [bon_budget(s, int(n), int(p))[k] for n, p in
                        zip(bon["n"], bon["n_prompts"], strict=True)], dtype=BUDGET_TYPES[k])
          for k in BUDGET_COLUMNS),
        # BoN's KL refers to pi_ref at the cache's sampling distribution (generation section)
        *(pl.lit(v).alias(k) for k, v in sampling_columns(s).items()),
    ).with_columns(pl.when(pl.col("n") == 1).then(None).otherwise(pl.col("beta")).alias("beta"))
    rows = _with_run_budgets(s, _with_sweeps(s, rows), train_logs or {}, schema)
    table = pl.concat([rows, bon_rows.select(list(schema)).cast(schema)])
    front = pareto_flags_se(table["kl"].to_numpy(), table["gold"].to_numpy(),
                            table["gold_se"].fill_null(0.0).to_numpy(),
                            table["kl_se"].fill_null(0.0).to_numpy(), z=PARETO_Z)
    return table.with_columns(pl.Series("pareto", front))


def _with_sweeps(s: Settings, rows: pl.DataFrame) -> pl.DataFrame:
    """``rows`` with each method run's ``sweep`` and training ``seed`` (null for sft)."""
    runs = s.methods
    return rows.with_columns(
        pl.col("policy").map_elements(lambda p: runs[p].sweep if p in runs else None,
                                      return_dtype=pl.String).alias("sweep"),
        pl.col("policy").map_elements(lambda p: runs[p].seed if p in runs else None,
                                      return_dtype=pl.Int32).alias("seed"))


def _with_run_budgets(s: Settings, rows: pl.DataFrame, train_logs: Mapping[str, PathLike],
                      schema) -> pl.DataFrame:
    """``rows`` with each method run's budget columns filled from its training log."""
    if rows.height == 0 or not train_logs:
        return rows
    budgets = [{"policy": name, **run_budget(s, s.methods[name], read_polars(path, "policy_log"))}
               for name, path in train_logs.items() if name in s.methods]
    if not budgets:
        return rows
    filled = pl.DataFrame(budgets, schema={"policy": pl.String, **BUDGET_TYPES})
    out = rows.drop(BUDGET_COLUMNS).join(filled, on="policy", how="left", maintain_order="left")
    return out.select(list(schema)).cast(schema)


def sweep_points_table(table: pl.DataFrame) -> pl.DataFrame:
    """The policy rows of a summary averaged over training seeds: one row per (sweep, point)
    (a point is a run name without its ``-s<seed>``), with ``n_seeds`` and the mean KL, gold
    and win rate. Standard errors: over seeds (SD / sqrt(S)) when a point has several, else the
    row's own (over prompts and samples; none for the win rate)."""
    pol = table.filter(pl.col("method") != "bon").with_columns(
        pl.col("sweep").fill_null(pl.col("policy")),
        pl.when(pl.col("seed").is_null()).then(pl.col("policy"))
        .otherwise(pl.col("policy").str.replace(r"-s\d+$", "")).alias("point"))
    se = {c: (pl.when(pl.len() > 1).then(pl.col(c).std() / pl.len().sqrt())
              .otherwise(pl.col(f"{c}_se").first() if f"{c}_se" in pol.columns else None))
          .alias(f"{c}_se") for c in ("kl", "gold", "win_rate_ref")}
    return (pol.group_by("sweep", "point", maintain_order=True)
            .agg(pl.col("method").first(), pl.len().alias("n_seeds"),
                 pl.col("kl", "gold", "win_rate_ref").mean(), *se.values())
            .sort("sweep", "kl"))


def run_summary(config: Settings | Mapping[str, Any], evals: Sequence[PathLike], bon_path: PathLike,
                out: PathLike, figures: Mapping[str, PathLike],
                csv: Mapping[str, PathLike] | None = None,
                train_logs: Mapping[str, PathLike] | None = None) -> None:
    """summary.parquet, CSV copies for the HTML report, and the three figures; with no policy
    evaluation (``evals`` empty: an imported cache) the BoN points and curves alone."""
    s = Settings.from_config(config)
    table = summary_table(s, evals, bon_path, train_logs)
    write_table(table, out, "eval_summary", provenance(s, "summary"))
    bon = read_polars(bon_path, "bon_curve")
    for frame, path in ((table, (csv or {}).get("summary")), (bon, (csv or {}).get("bon"))):
        if path:
            _write_csv(frame, path)
    plot_bon_curves(bon, figures["bon_curves"])
    objective = configured_objective_name(s.cdf, s.evaluation.uwo_lambdas)
    points = sweep_points_table(table)
    plot_kl_gold(table, points, bon.filter(pl.col("objective") == objective), figures["kl_gold"])
    plot_win_rates(table, figures["win_rates"])
    if "kl_win_rate" in figures:
        plot_kl_win_rate(table, points, figures["kl_win_rate"])


def _write_csv(frame: pl.DataFrame, path: PathLike) -> None:
    with atomic_file(path) as tmp:
        frame.write_csv(tmp, float_precision=6)
