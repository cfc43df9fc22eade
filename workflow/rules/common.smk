# Shared names for all rules. R is the task's results directory.
R = f"results/{config['task']}"
SPLITS = ["train", "test"]
RM_SEEDS = config["reward_models"]["seeds"]
SHARDS = list(range(config["sampling"]["shards"]))
THREADS = config["threads"]
# GPU rules ask for one GPU when the config runs on cuda; a cluster profile may override.
GPUS = 1 if config["device"] == "cuda" else 0
# The training jobs (sft, reward_model, train) run training.launch.num_processes processes, one
# per GPU, and ask for that many GPUs whenever they may use one (the profile leaves their `gpu`
# to this value).
TRAIN_GPUS = 0 if config["device"] == "cpu" else config["training"]["launch"]["num_processes"]


wildcard_constraints:
    split="train|test",
    seed=r"\d+",
    shard=r"\d+",


from pipeline_lib.config import canonical


def section(*names):
    """Config sections a rule depends on, as params (a change reruns the rule; keys sorted, so
    reordering a config file changes nothing)."""
    return {n: canonical(config[n]) for n in names}


def cdf_norm_reference(wildcards):
    """Members are z-normalised against the train reward cache when cdf.normalize is set."""
    return {"norm_reference": f"{R}/rewards/train.parquet"} if config["cdf"]["normalize"] else {}


from pipeline_lib.methods import PPO_METHODS, PREFERENCE_METHODS, method_runs, pair_sizes

RUNS = method_runs(config)
PAIR_NS = pair_sizes(RUNS)


wildcard_constraints:
    policy="|".join(RUNS) or "(?!)",
    n=r"\d+",


def train_inputs(wildcards):
    """What a method run reads: the SFT policy, plus the cache pieces its method needs."""
    spec = RUNS[wildcards.policy]
    inputs = {"policy": f"{R}/models/sft"}
    if spec["method"] in PPO_METHODS:
        inputs["prompts"] = f"{R}/data/prompts-train.parquet"
        inputs["rewards"] = f"{R}/rewards/train.parquet"
        inputs["reward_models"] = expand(f"{R}/models/rm-seed{{seed}}", seed=RM_SEEDS)
    if spec["method"] in ("vbon", "bond"):
        inputs["cdf"] = f"{R}/cdf/train.parquet"
    if spec["method"] in PREFERENCE_METHODS or spec["method"] == "bond":
        inputs["pairs"] = f"{R}/data/bon{spec['n']}-pairs.parquet"
    return inputs


EVAL_POLICIES = ["sft", *RUNS]


wildcard_constraints:
    evalpolicy="|".join(["sft", *RUNS]),


def policy_dir(wildcards):
    """The SFT reference is evaluated like any trained policy."""
    if wildcards.evalpolicy == "sft":
        return f"{R}/models/sft"
    return f"{R}/policies/{wildcards.evalpolicy}"


def bon_curve_inputs(wildcards):
    return {"train_rewards": f"{R}/rewards/train.parquet"} if config["cdf"]["normalize"] else {}


def sample_inputs(wildcards):
    """PRS sampling is guided by the proxy reward models."""
    if config["sampling"]["strategy"] == "prs":
        return {"reward_models": expand(f"{R}/models/rm-seed{{seed}}", seed=RM_SEEDS)}
    return {}


def prs_compare_inputs(wildcards):
    c = config["prs_compare"]
    inputs = {"instructions": f"{R}/data/prs-instructions.parquet"}
    if c["model"] == "sft":
        inputs["model"] = f"{R}/models/sft"
    elif c["model"] == "smollm2":
        inputs["model"] = "results/base-models/smollm2"
    else:
        inputs["model"] = c["model"]
    if c["scorer"] == "proxy":
        inputs["reward_models"] = expand(f"{R}/models/rm-seed{{seed}}", seed=RM_SEEDS)
        inputs["train_rewards"] = f"{R}/rewards/train.parquet"
    return inputs


def prs_instruction_inputs(wildcards):
    if config["prs_compare"]["instructions"] == "prompts-test":
        return {"prompts_test": f"{R}/data/prompts-test.parquet"}
    return {}
