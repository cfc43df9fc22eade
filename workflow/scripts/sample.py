"""Snakemake script for rule `sample` (one prompt shard of one split)."""
from pipeline_lib.io.logs import job_logging
from pipeline_lib.stages.sample import run_sample_shard

wc = snakemake.wildcards
with job_logging(snakemake.log[0], f"{snakemake.rule} {wc.split} shard {wc.shard}"):
    run_sample_shard(
        snakemake.config,
        split=wc.split,
        shard=int(wc.shard),
        policy_dir=snakemake.input.get("policy"),
        prompts_path=snakemake.input.prompts,
        out=snakemake.output[0],
        threads=snakemake.threads,
        reward_models=dict(zip(snakemake.params.names, snakemake.input.get("reward_models", []),
                               strict=False)),
    )
