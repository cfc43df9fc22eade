"""Snakemake script for rule `sft`."""
from pipeline_lib.io.logs import job_logging
from pipeline_lib.stages.sft import run_sft

with job_logging(snakemake.log[0], snakemake.rule):
    run_sft(
        snakemake.config,
        corpus_train=snakemake.input.corpus_train,
        corpus_test=snakemake.input.corpus_test,
        out_dir=snakemake.output.model,
        log_table=snakemake.output.log_table,
        checkpoint_dir=snakemake.params.checkpoint_dir,
        threads=snakemake.threads,
    )
