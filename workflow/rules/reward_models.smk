rule preferences:
    """Pairs of SFT samples on the pref prompts, labelled by the gold scorer (+ label noise)."""
    input:
        unpack(gold_model_files),
        policy=f"{R}/models/sft",
        prompts=f"{R}/data/prompts-pref.parquet",
    output:
        f"{R}/data/preferences.parquet",
    params:
        cfg=section("seed", "generation", "gold", "preferences"),
    log:
        f"{R}/logs/preferences.log",
    benchmark:
        f"{R}/benchmarks/preferences.tsv"
    threads: THREADS
    resources:
        gpu=GPUS,
    script:
        "../scripts/preferences.py"


rule reward_model:
    """One seed of the proxy reward-model ensemble (Bradley-Terry, initialised from SFT)."""
    input:
        preferences=f"{R}/data/preferences.parquet",
        policy=f"{R}/models/sft",
    output:
        model=directory(f"{R}/models/rm-seed{{seed}}"),
        log_table=f"{R}/logs/rm-seed{{seed}}.parquet",
    params:
        cfg=section("seed", "reward_models"),
        checkpoint_dir=lambda wc: f"{R}/checkpoints/rm-seed{wc.seed}",
    log:
        f"{R}/logs/rm-seed{{seed}}.log",
    benchmark:
        f"{R}/benchmarks/rm-seed{{seed}}.tsv"
    threads: THREADS
    resources:
        gpu=TRAIN_GPUS,
    script:
        "../scripts/reward_model.py"
