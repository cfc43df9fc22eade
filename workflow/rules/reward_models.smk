rule preferences:
    """Pairs of SFT samples on the pref prompts, labelled by the gold scorer (+ label noise)."""
    input:
        unpack(gold_model_files),
        unpack(reference_input),
        prompts=f"{R}/data/prompts-pref.parquet",
    output:
        f"{R}/data/preferences.parquet",
    params:
        cfg={**section("seed", "generation", "gold", "preferences"), **reference_settings()},
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
    """One trained seed of the proxy ensemble (Bradley-Terry), initialised from
    reward_models.base (the SFT policy, or another model)."""
    input:
        unpack(reward_model_init),
        preferences=f"{R}/data/preferences.parquet",
    output:
        model=directory(f"{R}/models/rm-seed{{seed}}"),
        log_table=f"{R}/logs/rm-seed{{seed}}.parquet",
    params:
        cfg=reward_model_settings(),
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
