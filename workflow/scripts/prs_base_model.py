"""Snakemake script for rule `prs_base_model`."""
from pipeline_lib.io.logs import job_logging
from pipeline_lib.stages.prs_base_model import run_convert_smollm2

with job_logging(snakemake.log[0], snakemake.rule):
    run_convert_smollm2(snakemake.output[0])
