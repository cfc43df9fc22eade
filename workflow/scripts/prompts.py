"""Snakemake script for rule `prompts`: a thin call into pipeline_lib.stages."""
from pipeline_lib.io.logs import job_logging
from pipeline_lib.stages.prompts import run_prompts

with job_logging(snakemake.log[0], snakemake.rule):
    out = snakemake.output
    run_prompts(
        snakemake.config,
        prompts_out={"train": out.train, "test": out.test, "pref": out.pref},
        corpus_out={"train": out.corpus_train, "test": out.corpus_test},
    )
