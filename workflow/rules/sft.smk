rule sft:
    """Reference policy: a GPT-2 (+ BPE tokenizer) trained from scratch, or a local base model fine-tuned."""
    input:
        corpus_train=f"{R}/data/corpus-train.parquet",
        corpus_test=f"{R}/data/corpus-test.parquet",
    output:
        model=directory(f"{R}/models/sft"),
        log_table=f"{R}/logs/sft.parquet",
    params:
        cfg=section("seed", "device", "policy", "sft"),
        checkpoint_dir=f"{R}/checkpoints/sft",
    log:
        f"{R}/logs/sft.log",
    threads: THREADS
    resources:
        gpu=TRAIN_GPUS,
        mem_mb=8000,
        runtime=120,
    script:
        "../scripts/sft.py"
