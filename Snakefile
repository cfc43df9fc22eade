# Best-of-N alignment pipeline. See README.md; stages in workflow/rules/*.smk.
# report: the summary figures and tables are flagged with report(); `snakemake --report report.html`.
# Per-rule resources (memory, time, CPUs per GPU) live in the workflow profile
# profiles/default/config.yaml, which Snakemake reads by itself; cluster settings in a profile
# of yours (`--profile slurm`, see README).
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


validate(config, "workflow/schemas/config.schema.yaml", set_default=True)

from pipeline_lib.settings.config import ConfigError, check_config, canonical

try:
    SETTINGS = check_config(config)
except ConfigError as exc:
    raise WorkflowError(f"invalid configuration: {exc}") from None


# A real run resolves every model the config names (hub id or local directory, through the
# Hugging Face cache) and checks how it is used before its first job starts; a dry run (-n)
# plans without any model file (Snakemake runs onstart neither in dry runs nor in its jobs).
onstart:
    from pipeline_lib.stages.preflight import check_models

    try:
        check_models(SETTINGS)
    except ConfigError as exc:
        raise WorkflowError(f"model preflight failed:\n{exc}") from None


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/sft.smk"
include: "workflow/rules/reward_models.smk"
include: "workflow/rules/sampling.smk"
include: "workflow/rules/cdf.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/prs.smk"


# Tiny CPU jobs run where Snakemake runs (under a cluster profile: on the submitting host,
# not as cluster jobs).
localrules:
    prompts,
    gather_samples,
    import_cache,
    cdf,
    pairs,
    bon_curve,
    summary,
    prs_instructions,
    chatterbot_dataset,


# With an imported reference cache (reference_cache.source: import; no method runs): the CDFs
# of the imported splits and, with a test file, the BoN curves; no model is trained.
rule all:
    default_target: True
    input:
        expand(f"{R}/cdf/{{split}}.parquet", split=CACHE_SPLITS if IMPORT else SPLITS),
        [] if IMPORT else expand(f"{R}/logs/rm-seed{{seed}}.parquet", seed=RM_SEEDS),
        expand(f"{R}/logs/train-{{policy}}.parquet", policy=RUNS),
        ([f"{R}/eval/bon.parquet"] if "test" in CACHE_SPLITS else []) if IMPORT
        else f"{R}/summary.parquet",
        [f"{R}/prs/compare.parquet"] if config["prs_compare"]["enabled"] else [],
