rule sft:
    """Reference policy: a GPT-2 (+ BPE tokenizer) trained from scratch, or a local base model fine-tuned."""
    input:
        unpack(base_model_files),
        corpus_train=f"{R}/data/corpus-train.parquet",
        corpus_test=f"{R}/data/corpus-test.parquet",
    output:
        model=directory(f"{R}/models/sft"),
        log_table=f"{R}/logs/sft.parquet",
    params:
        cfg=section("seed", "policy", "sft"),
        checkpoint_dir=f"{R}/checkpoints/sft",
    log:
        f"{R}/logs/sft.log",
    benchmark:
        f"{R}/benchmarks/sft.tsv"
    threads: THREADS
    resources:
        gpu=TRAIN_GPUS,
    script:
        "../scripts/sft.py"
