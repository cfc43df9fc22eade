rule pairs:
    """Best and worst of the first n cached train samples per prompt (nested across n)."""
    input:
        samples=f"{R}/samples/train.parquet",
        rewards=f"{R}/rewards/train.parquet",
    output:
        f"{R}/data/bon{{n}}-pairs.parquet",
    params:
        cfg=only("cdf", *PROXY),
    log:
        f"{R}/logs/pairs-bon{{n}}.log",
    script:
        "../scripts/pairs.py"


rule train:
    """One alignment run ({policy} = e.g. vbon-n8-exact) from the SFT policy on the cache; with
    training.launch set, in num_processes processes (one per GPU) under `accelerate launch`."""
    input:
        unpack(train_inputs),
    output:
        model=directory(f"{R}/policies/{{policy}}"),
        log_table=f"{R}/logs/train-{{policy}}.parquet",
    params:
        cfg=train_settings,
        checkpoint_dir=lambda wc: f"{R}/checkpoints/{wc.policy}",
    log:
        f"{R}/logs/train-{{policy}}.log",
    benchmark:
        f"{R}/benchmarks/train-{{policy}}.tsv"
    threads: THREADS
    resources:
        gpu=TRAIN_GPUS,
    script:
        "../scripts/train.py"
