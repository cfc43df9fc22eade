# Best-of-N alignment pipeline. See README.md; stages in workflow/rules/*.smk.
# report: the summary figures and tables are flagged with report(); `snakemake --report report.html`.
# Per-rule resources (memory, time, CPUs per GPU) live in the workflow profile
# profiles/default/config.yaml, which Snakemake reads by itself; cluster settings in a profile
# of yours (`--profile slurm`, see README).
from snakemake.utils import min_version, validate

min_version("9.0")


# config/config.yaml is the default task. A config file given with --configfile replaces it
# (Snakemake's own `configfile:` would merge the two, leaking the toy task's keys into yours);
# several --configfile files merge in order (e.g. a recipe, then an override of yours).
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


import copy

AS_WRITTEN = copy.deepcopy(config)  # before the schema fills defaults: the inert-key check
validate(config, "workflow/schemas/config.schema.yaml", set_default=True)

from pipeline_lib.settings.config import ConfigError, check_config, canonical
from pipeline_lib.settings.inert import describe_inert, inert_keys

try:
    SETTINGS = check_config(config)
except ConfigError as exc:
    raise WorkflowError(f"invalid configuration: {exc}") from None
for line in describe_inert(inert_keys(AS_WRITTEN, SETTINGS)):
    logger.warning(f"warning: {line}")


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
    frontier,
    summary,
    prs_instructions,
    chatterbot_dataset,


# default_target prs_compare: only the random-vs-PRS comparison.
PRS_ONLY = config["default_target"] == "prs_compare"


# With an imported reference cache (reference_cache.source: import; no method runs): the CDFs
# of the imported splits and, with a test file, the BoN curves and the summary of the BoN
# points (table, CSVs, figures); no model is trained or evaluated.
rule all:
    default_target: True
    input:
        [f"{R}/prs/compare.parquet"] if config["prs_compare"]["enabled"] else [],
        [] if PRS_ONLY else expand(f"{R}/cdf/{{split}}.parquet",
                                   split=CACHE_SPLITS if IMPORT else SPLITS),
        [] if IMPORT or PRS_ONLY else expand(f"{R}/logs/rm-seed{{seed}}.parquet", seed=RM_SEEDS),
        [] if PRS_ONLY else expand(f"{R}/logs/train-{{policy}}.parquet", policy=RUNS),
        [] if PRS_ONLY or (IMPORT and "test" not in CACHE_SPLITS) else f"{R}/summary.parquet",
        [] if PRS_ONLY or IMPORT or not RUNS else f"{R}/frontier.parquet",
