"""Snakemake script for rule `bon_curve`."""
from pipeline_lib.io.logs import job_logging
from pipeline_lib.stages.bon_curve import run_bon_curve

with job_logging(snakemake.log[0], snakemake.rule):
    run_bon_curve(
        snakemake.config,
        rewards_path=snakemake.input.rewards,
        train_rewards=snakemake.input.get("train_rewards"),
        out=snakemake.output[0],
    )
