"""Snakemake script for rule `score` (the reward cache)."""
from pipeline_lib.io.logs import job_logging
from pipeline_lib.stages.score import run_score

with job_logging(snakemake.log[0], f"{snakemake.rule} {snakemake.wildcards.split}"):
    run_score(
        snakemake.config,
        split=snakemake.wildcards.split,
        samples_path=snakemake.input.samples,
        reward_models=dict(zip(snakemake.params.names, snakemake.input.reward_models, strict=True)),
        out=snakemake.output[0],
        threads=snakemake.threads,
    )
