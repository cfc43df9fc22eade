"""Snakemake script for rule `chatterbot_dataset`."""
from pipeline_lib.io.logs import job_logging
from pipeline_lib.stages.prs_instructions import run_chatterbot_dataset

with job_logging(snakemake.log[0], snakemake.rule):
    run_chatterbot_dataset(snakemake.output[0])
