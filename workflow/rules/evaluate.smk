rule bon_curve:
    """BoN curves on the test cache: every objective, every n on the grid, with the KL axis."""
    input:
        unpack(bon_curve_inputs),
        rewards=f"{R}/rewards/test.parquet",
    output:
        f"{R}/eval/bon.parquet",
    params:
        cfg={**only("cdf", "normalize"),
             **only("evaluation", "bon_ns", "uwo_lambdas", "win_rate_judges")},
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
    """One table and three figures over every policy and BoN point. An imported reference
    cache trains no policy and has no pi_ref to evaluate: its summary holds the BoN points."""
    input:
        evals=expand(f"{R}/eval/summary-{{evalpolicy}}.parquet",
                     evalpolicy=[] if IMPORT else EVAL_POLICIES),
        logs=expand(f"{R}/logs/train-{{run}}.parquet", run=list(RUNS)),
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
        kl_win_rate=report(f"{R}/figures/kl_win_rate.png", category="Methods",
                           caption="../report/kl_win_rate.rst"),
    params:
        # the BoN points' objective, win_rate_n and sampling columns (the rest is in its inputs)
        cfg={**only("cdf", "objective", "uwo_lambda"),
             **only("evaluation", "uwo_lambdas", "win_rate_n"),
             **only("generation", "temperature", "top_p", "top_k")},
        # each run's sweep and seed (the summary's columns); the budget columns follow the
        # training logs, which change whenever what they count does
        runs=[(r, RUNS[r].sweep, canonical(RUNS[r].as_dict())) for r in RUNS],
    log:
        f"{R}/logs/summary.log",
    script:
        "../scripts/summary.py"


rule frontier:
    """Each method sweep's gold and win rate on the BoN points' KL grid, with bootstrap
    confidence intervals over test prompts and training seeds, and the gap to BoN."""
    input:
        unpack(bon_curve_inputs),
        evals=expand(f"{R}/eval/policy-{{run}}.parquet", run=list(RUNS)),
        rewards=f"{R}/rewards/test.parquet",
    output:
        f"{R}/frontier.parquet",
    params:
        runs=list(RUNS),
        # the runs' sweeps, seeds and knobs; the BoN grid, judges and objective
        methods=[(r, RUNS[r].sweep, canonical(RUNS[r].as_dict())) for r in RUNS],
        cfg={**section("seed"), **only("cdf", "objective", "uwo_lambda", "normalize"),
             **only("evaluation", "bon_ns", "uwo_lambdas", "win_rate_judges")},
    log:
        f"{R}/logs/frontier.log",
    script:
        "../scripts/frontier.py"
