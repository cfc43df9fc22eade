"""Snakemake script for rule `train` (one method run)."""
from pipeline_lib.io.logs import job_logging
from pipeline_lib.stages.train import run_train

inp = snakemake.input
name = snakemake.wildcards.policy
with job_logging(snakemake.log[0], f"{snakemake.rule} {name}"):
    run_train(
        snakemake.config,
        name=name,
        policy_dir=inp.get("policy"),
        out_dir=snakemake.output.model,
        log_table=snakemake.output.log_table,
        checkpoint_dir=snakemake.params.checkpoint_dir,
        prompts_path=inp.get("prompts"),
        cdf_path=inp.get("cdf"),
        rewards_path=inp.get("rewards"),
        reward_models={f"rm-seed{s}": p for s, p in
                       zip(snakemake.config["reward_models"]["seeds"], inp.get("reward_models", []),
                           strict=False)},
        pairs_path=inp.get("pairs"),
        threads=snakemake.threads,
    )
