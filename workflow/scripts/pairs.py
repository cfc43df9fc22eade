"""Snakemake script for rule `pairs`."""
from pipeline_lib.io.logs import job_logging
from pipeline_lib.stages.pairs import run_pairs

with job_logging(snakemake.log[0], f"{snakemake.rule} n={snakemake.wildcards.n}"):
    run_pairs(
        snakemake.config,
        n=int(snakemake.wildcards.n),
        samples_path=snakemake.input.samples,
        rewards_path=snakemake.input.rewards,
        out=snakemake.output[0],
    )
