rule sample:
    """M reference samples for one shard of a split's prompts, with reference log-probs."""
    input:
        unpack(sample_inputs),
        policy=f"{R}/models/sft",
        prompts=f"{R}/data/prompts-{{split}}.parquet",
    output:
        temp(f"{R}/samples/{{split}}/shard-{{shard}}.parquet"),
    params:
        cfg=section("seed", "device", "generation", "sampling", "prs"),
        names=[f"rm-seed{s}" for s in RM_SEEDS],
    log:
        f"{R}/logs/sample-{{split}}-{{shard}}.log",
    threads: THREADS
    resources:
        gpu=GPUS,
        mem_mb=8000,
        runtime=120,
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
    resources:
        mem_mb=4000,
        runtime=10,
    script:
        "../scripts/gather_samples.py"


rule score:
    """The reward cache: gold and every proxy reward model on every cached sample."""
    input:
        samples=f"{R}/samples/{{split}}.parquet",
        reward_models=expand(f"{R}/models/rm-seed{{seed}}", seed=RM_SEEDS),
    output:
        f"{R}/rewards/{{split}}.parquet",
    params:
        cfg=section("device", "gold", "scoring"),
        names=[f"rm-seed{s}" for s in RM_SEEDS],
    log:
        f"{R}/logs/score-{{split}}.log",
    threads: THREADS
    resources:
        gpu=GPUS,
        mem_mb=8000,
        runtime=60,
    script:
        "../scripts/score.py"
