"""Snakemake script for rule `import_cache`."""
from pipeline_lib.io.logs import job_logging
from pipeline_lib.stages.import_cache import run_import_cache

with job_logging(snakemake.log[0], f"{snakemake.rule} {snakemake.wildcards.split}"):
    run_import_cache(
        snakemake.config,
        split=snakemake.wildcards.split,
        source=snakemake.input.cache,
        samples_out=snakemake.output.samples,
        rewards_out=snakemake.output.rewards,
    )
