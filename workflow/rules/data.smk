def corpus_dataset_files(wildcards):
    """corpus.dataset's local files (a folder, a save_to_disk folder or local data_files), so
    editing one reruns the rule; a hub id is no file input."""
    from pipeline_lib.io.datasets import local_dataset_files

    files = local_dataset_files(config["corpus"]["dataset"], config["corpus"]["data_files"])
    return {"dataset": files} if files else {}


def prefix_tokenizer_settings():
    """Token prefixes are cut with policy.base's tokenizer (its name, and a local directory's
    files as inputs)."""
    if config["prompts"]["prefix_unit"] != "tokens" or config["corpus"]["format"] != "text_prefix":
        return {}, {}
    files = local_model_files(config["policy"]["base"])
    return only("policy", "base", "revision", "trust_remote_code"), (
        {"tokenizer_files": files} if files else {})


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
        cfg={**section("seed", "corpus", "prompts"), **only("sft", "enabled"),
             **prefix_tokenizer_settings()[0]},
    log:
        f"{R}/logs/prompts.log",
    script:
        "../scripts/prompts.py"
