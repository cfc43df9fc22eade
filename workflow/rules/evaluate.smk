rule bon_curve:
    """BoN curves on the test cache: every objective, every n on the grid, with the KL axis."""
    input:
        unpack(bon_curve_inputs),
        rewards=f"{R}/rewards/test.parquet",
    output:
        f"{R}/eval/bon.parquet",
    params:
        cfg={**only("cdf", "normalize"), **only("evaluation", "bon_ns", "uwo_lambdas")},
    log:
        f"{R}/logs/bon_curve.log",
    script:
        "../scripts/bon_curve.py"


rule evaluate:
    """K samples per test prompt from one policy (or the SFT reference itself): gold, proxy,
    KL to the reference (k1 with standard error, k3) and win rates."""
    input:
        unpack(gold_model_files),
        unpack(evaluate_inputs),
        unpack(proxy_member_inputs),
        prompts=f"{R}/data/prompts-test.parquet",
        test_rewards=f"{R}/rewards/test.parquet",
        train_rewards=f"{R}/rewards/train.parquet",
    output:
        samples=f"{R}/eval/policy-{{evalpolicy}}.parquet",
        summary=f"{R}/eval/summary-{{evalpolicy}}.parquet",
    params:
        # evaluation.bon_ns is the BoN-curve grid (bon_curve), not read here
        cfg={**section("seed", "generation", "gold", "scoring"), **only("cdf", *PROXY),
             **proxy_member_settings(),
             **reference_settings(),
             **without("evaluation", "bon_ns")},
        names=[f"rm-seed{s}" for s in RM_SEEDS],
    log:
        f"{R}/logs/evaluate-{{evalpolicy}}.log",
    benchmark:
        f"{R}/benchmarks/evaluate-{{evalpolicy}}.tsv"
    threads: THREADS
    resources:
        gpu=GPUS,
    script:
        "../scripts/evaluate.py"


rule summary:
    """One table and three figures over every policy and BoN point."""
    input:
        evals=expand(f"{R}/eval/summary-{{evalpolicy}}.parquet", evalpolicy=EVAL_POLICIES),
        bon=f"{R}/eval/bon.parquet",
    output:
        table=f"{R}/summary.parquet",
        table_csv=report(f"{R}/summary.csv", category="Tables",
                         caption="../report/summary.rst"),
        bon_csv=report(f"{R}/eval/bon.csv", category="Tables",
                       caption="../report/bon_table.rst"),
        bon_curves=report(f"{R}/figures/bon_curves.png", category="BoN curves",
                          caption="../report/bon_curves.rst"),
        kl_gold=report(f"{R}/figures/kl_gold.png", category="Methods",
                       caption="../report/kl_gold.rst"),
        win_rates=report(f"{R}/figures/win_rates.png", category="Methods",
                         caption="../report/win_rates.rst"),
    log:
        f"{R}/logs/summary.log",
    script:
        "../scripts/summary.py"
