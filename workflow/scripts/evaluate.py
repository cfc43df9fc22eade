"""Snakemake script for rule `evaluate` (one policy)."""
from pipeline_lib.io.logs import job_logging
from pipeline_lib.stages.evaluate import run_evaluate

inp = snakemake.input
name = snakemake.wildcards.evalpolicy
with job_logging(snakemake.log[0], f"{snakemake.rule} {name}"):
    run_evaluate(
        snakemake.config,
        name=name,
        policy_dir=inp.get("policy"),
        reference_dir=inp.get("reference"),
        prompts_path=inp.prompts,
        reward_models=dict(zip(snakemake.params.names, inp.reward_models, strict=True)),
        test_rewards=inp.test_rewards,
        train_rewards=inp.train_rewards,
        samples_out=snakemake.output.samples,
        summary_out=snakemake.output.summary,
        threads=snakemake.threads,
    )
