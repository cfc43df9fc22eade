"""Snakemake script for rule `prs_instructions`."""
from pipeline_lib.io.logs import job_logging
from pipeline_lib.stages.prs_instructions import run_prs_instructions

with job_logging(snakemake.log[0], snakemake.rule):
    run_prs_instructions(snakemake.config, snakemake.output[0],
                         prompts_test=snakemake.input.get("prompts_test"))
