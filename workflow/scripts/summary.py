"""Snakemake script for rule `summary`."""
from pipeline_lib.io.logs import job_logging
from pipeline_lib.stages.summary import run_summary

out = snakemake.output
with job_logging(snakemake.log[0], snakemake.rule):
    run_summary(
        snakemake.config,
        evals=list(snakemake.input.evals),
        bon_path=snakemake.input.bon,
        out=out.table,
        csv={"summary": out.table_csv, "bon": out.bon_csv},
        train_logs=dict(zip([r for r, _, _ in snakemake.params.runs], snakemake.input.logs,
                            strict=True)),
        figures={"bon_curves": out.bon_curves, "kl_gold": out.kl_gold, "win_rates": out.win_rates,
                 "kl_win_rate": out.kl_win_rate},
    )
