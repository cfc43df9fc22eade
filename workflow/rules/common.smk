# Shared names for all rules. R is the task's results directory.
R = f"results/{config['task']}"
SPLITS = ["train", "test"]
RM_SEEDS = config["reward_models"]["seeds"]
SHARDS = list(range(config["sampling"]["shards"]))
THREADS = config["threads"]
# GPU rules ask for one GPU when the config runs on cuda; a cluster profile may override.
GPUS = 1 if config["device"] == "cuda" else 0


wildcard_constraints:
    split="train|test",
    seed=r"\d+",
    shard=r"\d+",


def section(*names):
    """Config sections a rule depends on, as params (a change reruns the rule)."""
    return {n: config[n] for n in names}


def cdf_norm_reference(wildcards):
    """Members are z-normalised against the train reward cache when cdf.normalize is set."""
    return {"norm_reference": f"{R}/rewards/train.parquet"} if config["cdf"]["normalize"] else {}
