"""Snakemake script for rule `gather_samples`."""
from pipeline_lib.io.logs import job_logging
from pipeline_lib.stages.gather import run_gather

with job_logging(snakemake.log[0], f"{snakemake.rule} {snakemake.wildcards.split}"):
    run_gather(
        snakemake.config,
        split=snakemake.wildcards.split,
        shards=list(snakemake.input.shards),
        prompts_path=snakemake.input.prompts,
        out=snakemake.output[0],
    )
