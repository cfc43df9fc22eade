rule sample:
    """M reference samples for one shard of a split's prompts, with reference log-probs."""
    input:
        unpack(sample_inputs),
        unpack(reference_input),
        prompts=f"{R}/data/prompts-{{split}}.parquet",
    output:
        temp(f"{R}/samples/{{split}}/shard-{{shard}}.parquet"),
    params:
        cfg=sample_settings,
        names=[f"rm-seed{s}" for s in RM_SEEDS],
    log:
        f"{R}/logs/sample-{{split}}-{{shard}}.log",
    benchmark:
        f"{R}/benchmarks/sample-{{split}}-{{shard}}.tsv"
    threads: THREADS
    resources:
        gpu=GPUS,
    script:
        "../scripts/sample.py"


rule gather_samples:
    """Concatenate the shards; every prompt and sample must be present exactly once."""
    input:
        shards=expand(f"{R}/samples/{{{{split}}}}/shard-{{shard}}.parquet", shard=SHARDS),
        prompts=f"{R}/data/prompts-{{split}}.parquet",
    output:
        f"{R}/samples/{{split}}.parquet",
    log:
        f"{R}/logs/gather-{{split}}.log",
    script:
        "../scripts/gather_samples.py"


rule score:
    """The reward cache: gold and every proxy member (trained seeds, pretrained reward models)
    on every cached sample."""
    input:
        unpack(gold_model_files),
        unpack(proxy_member_inputs),
        samples=f"{R}/samples/{{split}}.parquet",
    output:
        f"{R}/rewards/{{split}}.parquet",
    params:
        cfg={**section("gold", "scoring"), **proxy_member_settings()},
        names=[f"rm-seed{s}" for s in RM_SEEDS],
    log:
        f"{R}/logs/score-{{split}}.log",
    benchmark:
        f"{R}/benchmarks/score-{{split}}.tsv"
    threads: THREADS
    resources:
        gpu=GPUS,
    script:
        "../scripts/score.py"


# reference_cache.source import: a published cache instead of sample -> gather_samples ->
# score, for the splits with a file (the split constraint matches no split otherwise, so the
# generating rules alone make these files and the plan is unchanged).
ruleorder: import_cache > gather_samples
ruleorder: import_cache > score


rule import_cache:
    """A published reward cache file as one split's samples and rewards tables (no token ids or
    reference log-probs; strategy random)."""
    input:
        cache=lambda wc: config["reference_cache"]["files"][wc.split],
    output:
        samples=f"{R}/samples/{{split}}.parquet",
        rewards=f"{R}/rewards/{{split}}.parquet",
    wildcard_constraints:
        split=alternatives(CACHE_SPLITS),
    params:
        cfg={**section("reference_cache"), **only("sampling", "M")},
    log:
        f"{R}/logs/import_cache-{{split}}.log",
    script:
        "../scripts/import_cache.py"
