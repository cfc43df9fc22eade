rule prompts:
    """Corpus or dataset rows -> train/test split -> prompts (train, test, pref) and SFT rows."""
    input:
        unpack(corpus_file),
        unpack(corpus_dataset_files),
        **prefix_tokenizer_settings()[1],
    output:
        train=f"{R}/data/prompts-train.parquet",
        test=f"{R}/data/prompts-test.parquet",
        pref=f"{R}/data/prompts-pref.parquet",
        corpus_train=f"{R}/data/corpus-train.parquet",
        corpus_test=f"{R}/data/corpus-test.parquet",
    params:
        # sft.enabled: the stage refuses a format without SFT targets when SFT is on
        # reward_models.seeds: no pref prompts are drawn when no reward model is trained
        cfg={**section("seed", "corpus", "prompts"), **only("sft", "enabled"),
             **only("reward_models", "seeds"), **prefix_tokenizer_settings()[0]},
    log:
        f"{R}/logs/prompts.log",
    script:
        "../scripts/prompts.py"
