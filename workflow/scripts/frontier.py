"""Snakemake script for rule `frontier`."""
from pipeline_lib.io.logs import job_logging
from pipeline_lib.stages.frontier import run_frontier

inp = snakemake.input
with job_logging(snakemake.log[0], snakemake.rule):
    run_frontier(
        snakemake.config,
        evals=dict(zip(snakemake.params.runs, inp.evals, strict=True)),
        test_rewards=inp.rewards,
        train_rewards=inp.get("train_rewards"),
        out=snakemake.output[0],
    )
