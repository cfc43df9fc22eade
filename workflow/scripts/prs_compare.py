"""Snakemake script for rule `prs_compare`."""
from pipeline_lib.io.logs import job_logging
from pipeline_lib.stages.prs_compare import run_prs_compare

inp = snakemake.input
with job_logging(snakemake.log[0], snakemake.rule):
    run_prs_compare(
        snakemake.config,
        model_dir=inp.get("model"),
        instructions=inp.instructions,
        samples_out=snakemake.output.samples,
        summary_out=snakemake.output.summary,
        figure=snakemake.output.figure,
        reward_models=dict(zip(snakemake.params.names, inp.get("reward_models", []),
                               strict=False)),
        train_rewards=inp.get("train_rewards"),
        threads=snakemake.threads,
    )
