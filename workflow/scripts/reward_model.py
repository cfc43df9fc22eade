"""Snakemake script for rule `reward_model` (one ensemble member per seed)."""
from pipeline_lib.io.logs import job_logging
from pipeline_lib.stages.reward_model import run_reward_model

with job_logging(snakemake.log[0], f"{snakemake.rule} seed {snakemake.wildcards.seed}"):
    run_reward_model(
        snakemake.config,
        seed=int(snakemake.wildcards.seed),
        preferences=snakemake.input.preferences,
        policy_dir=snakemake.input.get("policy"),
        out_dir=snakemake.output.model,
        log_table=snakemake.output.log_table,
        checkpoint_dir=snakemake.params.checkpoint_dir,
        threads=snakemake.threads,
    )
