"""Snakemake script for rule `preferences`."""
from pipeline_lib.io.logs import job_logging
from pipeline_lib.stages.preferences import run_preferences

with job_logging(snakemake.log[0], snakemake.rule):
    run_preferences(
        snakemake.config,
        policy_dir=snakemake.input.get("policy"),
        prompts_path=snakemake.input.prompts,
        out=snakemake.output[0],
        threads=snakemake.threads,
    )
