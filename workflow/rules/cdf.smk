rule cdf:
    """Per prompt: the M proxy rewards under the ensemble objective, sorted (+ curvefit)."""
    input:
        unpack(cdf_norm_reference),
        rewards=f"{R}/rewards/{{split}}.parquet",
        samples=f"{R}/samples/{{split}}.parquet",
    output:
        f"{R}/cdf/{{split}}.parquet",
    params:
        cfg=section("cdf"),
    log:
        f"{R}/logs/cdf-{{split}}.log",
    script:
        "../scripts/cdf.py"
