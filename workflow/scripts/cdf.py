"""Snakemake script for rule `cdf`."""
from pipeline_lib.io.logs import job_logging
from pipeline_lib.stages.cdf import run_cdf

with job_logging(snakemake.log[0], f"{snakemake.rule} {snakemake.wildcards.split}"):
    run_cdf(
        snakemake.config,
        split=snakemake.wildcards.split,
        rewards_path=snakemake.input.rewards,
        samples_path=snakemake.input.samples,
        out=snakemake.output[0],
        norm_reference=snakemake.input.get("norm_reference"),
    )
