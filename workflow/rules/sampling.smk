rule sample:
    """M reference samples for one shard of a split's prompts, with reference log-probs."""
    input:
        unpack(sample_inputs),
        policy=f"{R}/models/sft",
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
    """The reward cache: gold and every proxy reward model on every cached sample."""
    input:
        unpack(gold_model_files),
        samples=f"{R}/samples/{{split}}.parquet",
        reward_models=expand(f"{R}/models/rm-seed{{seed}}", seed=RM_SEEDS),
    output:
        f"{R}/rewards/{{split}}.parquet",
    params:
        cfg=section("gold", "scoring"),
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
