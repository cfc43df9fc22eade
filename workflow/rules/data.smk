rule prompts:
    """Corpus -> group-wise train/test split -> 2-8 word prompts (train, test, pref)."""
    input:
        unpack(corpus_file),
    output:
        train=f"{R}/data/prompts-train.parquet",
        test=f"{R}/data/prompts-test.parquet",
        pref=f"{R}/data/prompts-pref.parquet",
        corpus_train=f"{R}/data/corpus-train.parquet",
        corpus_test=f"{R}/data/corpus-test.parquet",
    params:
        cfg=section("seed", "corpus", "prompts"),
    log:
        f"{R}/logs/prompts.log",
    script:
        "../scripts/prompts.py"
