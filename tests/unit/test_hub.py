"""Models by hub id or local directory: tiny random models of the papers' architectures in a
hub-layout cache built at test time (tests/support/tiny_hub.py), loaded offline by hub id
through pipeline_lib's loaders; revisions, snapshots and fingerprints, the one-line errors,
check_config's syntax-only checks and the preflight of a real run."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline_lib.models import loading
from pipeline_lib.models.hub import (
    ModelNotFoundError,
    download_patterns,
    loaded_models,
    resolve_model,
)
from pipeline_lib.settings.config import is_hub_id, validate_config
from pipeline_lib.settings.errors import ConfigError
from pipeline_lib.settings.sections import ModelRef, Settings
from pipeline_lib.stages.preflight import check_models

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "data" / "tiny.yaml"


def tiny_config(**sections) -> dict:
    """tests/data/tiny.yaml with some sections updated (one level deep), validated."""
    cfg = yaml.safe_load(TINY.read_text())
    for name, values in sections.items():
        if isinstance(values, dict) and isinstance(cfg.get(name), dict):
            cfg[name] = {**cfg[name], **values}
        else:
            cfg[name] = values
    return validate_config(cfg)


# ---------------------------------------------------------------------------------------------
# The cache itself
# ---------------------------------------------------------------------------------------------
def test_the_tiny_cache_is_laid_out_as_huggingface_hub_lays_it_out(tiny_hub):
    from huggingface_hub import scan_cache_dir, snapshot_download

    info = scan_cache_dir(tiny_hub.cache)
    assert not info.warnings
    # the models (other tests may add a dataset repo to the shared session cache)
    repos = {r.repo_id: r for r in info.repos if r.repo_type == "model"}
    assert set(repos) == set(tiny_hub.ids.values())
    gpt2 = repos[tiny_hub.ids["gpt2"]]
    assert {rev.commit_hash: set(rev.refs) for rev in gpt2.revisions} == {
        tiny_hub.commits[gpt2.repo_id]["main"]: {"main"},
        tiny_hub.commits[gpt2.repo_id]["v1"]: {"v1"},
    }
    snap = Path(snapshot_download(gpt2.repo_id, local_files_only=True))
    assert snap.name == tiny_hub.commits[gpt2.repo_id]["main"]
    weights = snap / "model.safetensors"
    assert weights.is_symlink() and weights.resolve().parent.name == "blobs"


def test_transformers_finds_the_tiny_models_by_hub_id_offline(tiny_hub):
    from transformers import AutoConfig, AutoTokenizer

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    config = AutoConfig.from_pretrained(tiny_hub.ids["distilbert"])
    assert config.id2label == {0: "NEGATIVE", 1: "POSITIVE"}
    tok = AutoTokenizer.from_pretrained(tiny_hub.ids["pythia"])
    assert tok.pad_token == "<|padding|>"  # GPTNeoXTokenizer's, in the vocabulary


# ---------------------------------------------------------------------------------------------
# Loading by hub id through pipeline_lib's loaders
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("short, arch", [
    ("gpt2", "GPT2LMHeadModel"),
    ("pythia", "GPTNeoXForCausalLM"),
    ("llama", "LlamaForCausalLM"),
])
def test_causal_lms_load_by_hub_id_and_generate(tiny_hub, short, arch):
    ref = ModelRef(tiny_hub.ids[short], key="policy.base")
    tok = loading.load_tokenizer(ref)
    model = loading.load_causal_lm(ref)
    assert type(model).__name__ == arch and not model.training
    assert tok.pad_token is not None  # GPT-2 and Llama have none: EOS pads
    batch = tok(["a great film", "the plot is dull and bad"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=3, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    assert out.shape[0] == 2 and out.shape[1] == batch["input_ids"].shape[1] + 3


def test_gpt2_pads_with_eos_and_llama_has_a_chat_template_and_two_eos_ids(tiny_hub):
    from pipeline_lib.models.encoding import eos_token_ids, uses_chat_template

    gpt2 = loading.load_tokenizer(tiny_hub.ids["gpt2"])
    assert gpt2.pad_token == gpt2.eos_token == "<|endoftext|>"
    ref = ModelRef(tiny_hub.ids["llama"], key="policy.base")
    tok, model = loading.load_tokenizer(ref), loading.load_causal_lm(ref)
    assert uses_chat_template(tok)
    ids = eos_token_ids(tok, model)
    assert ids == tok.convert_tokens_to_ids(["<|im_end|>", "</s>"])


@pytest.mark.parametrize("short, labels", [
    ("distilbert", {0: "NEGATIVE", 1: "POSITIVE"}),
    ("deberta", {0: "LABEL_0"}),
])
def test_classifiers_load_by_hub_id_and_score_pairs(tiny_hub, short, labels):
    ref = ModelRef(tiny_hub.ids[short], key="gold.model")
    tok = loading.load_tokenizer(ref)
    model = loading.load_sequence_classifier(ref)
    assert model.config.id2label == labels
    enc = tok(["a prompt", "another one"], ["a response", "and a reply"], padding=True,
              return_tensors="pt")
    assert enc["input_ids"][0, 0] == tok.cls_token_id  # [CLS] prompt [SEP] response [SEP]
    assert (enc["input_ids"] == tok.sep_token_id).sum(dim=1).tolist() == [2, 2]
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (2, len(labels)) and torch.isfinite(logits).all()


def test_a_plain_hub_id_string_loads_its_default_revision(tiny_hub):
    model = loading.load_causal_lm(tiny_hub.ids["gpt2"], key="policy")
    assert model.config.n_layer == 2
    assert loaded_models()["policy"] == {"name": tiny_hub.ids["gpt2"], "revision": None,
                                         "snapshot": tiny_hub.commits[tiny_hub.ids["gpt2"]]["main"]}


# ---------------------------------------------------------------------------------------------
# Revisions, snapshots, fingerprints
# ---------------------------------------------------------------------------------------------
def test_a_tag_and_a_commit_hash_select_that_snapshot(tiny_hub):
    repo = tiny_hub.ids["gpt2"]
    commits = tiny_hub.commits[repo]
    main = resolve_model(ModelRef(repo, key="policy.base"))
    tagged = resolve_model(ModelRef(repo, "v1", key="policy.base"))
    pinned = resolve_model(ModelRef(repo, commits["v1"], key="reward_models.base"))
    assert (main.snapshot, tagged.snapshot, pinned.snapshot) == (
        commits["main"], commits["v1"], commits["v1"])
    assert tagged.path == pinned.path != main.path
    assert loading.load_causal_lm(ModelRef(repo, "v1")).config.n_layer == 1
    assert loading.load_causal_lm(ModelRef(repo, commits["v1"])).config.n_layer == 1
    assert loading.load_causal_lm(ModelRef(repo)).config.n_layer == 2
    assert loaded_models()["reward_models.base"]["snapshot"] == commits["v1"]


def test_a_missing_hub_id_offline_is_one_line_naming_key_id_revision_and_command(tiny_hub):
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model(ModelRef("someone/not-cached", "v2", key="reward_models.pretrained[0].model"))
    msg = str(err.value)
    assert "\n" not in msg
    assert "reward_models.pretrained[0].model" in msg and "'someone/not-cached'" in msg
    assert "'v2'" in msg and msg.endswith("hf download someone/not-cached --revision v2")
    with pytest.raises(ModelNotFoundError, match="revision 'nope'"):
        resolve_model(ModelRef(tiny_hub.ids["gpt2"], "nope", key="policy.base"))
    with pytest.raises(ModelNotFoundError, match=r"hf download someone/x$"):
        loading.load_tokenizer("someone/x", "gold.model")


def test_a_name_that_is_neither_a_directory_nor_a_hub_id_names_the_key(tiny_hub, tmp_path):
    with pytest.raises(ModelNotFoundError, match="config key gold.model: local model directory "
                       ".* does not exist"):
        resolve_model(ModelRef(str(tmp_path / "missing" / "model"), key="gold.model"))
    with pytest.raises(ModelNotFoundError, match="config key gold.model: .* neither"):
        resolve_model(ModelRef("no model!", key="gold.model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="policy.base: .*no config.json"):
        loading.load_tokenizer(tmp_path / "empty")


def test_local_directory_fingerprint_follows_its_content(tiny_hub, tmp_path, tiny_policy_dir):
    import shutil

    local = tmp_path / "gold"
    shutil.copytree(resolve_model(ModelRef(tiny_hub.ids["distilbert"])).path, local)
    first = resolve_model(ModelRef(str(local), key="gold.model"))
    assert first.path == local and first.is_local
    assert re.fullmatch(r"sha256:[0-9a-f]{16}", first.snapshot)
    assert resolve_model(ModelRef(str(local), key="gold.model")).snapshot == first.snapshot
    model = loading.load_sequence_classifier(ModelRef(str(local), key="gold.model"))
    assert model.config.num_labels == 2
    config = local / "config.json"
    config.write_text(config.read_text().replace("NEGATIVE", "NEG"))
    assert resolve_model(ModelRef(str(local), key="gold.model")).snapshot != first.snapshot
    other = resolve_model(ModelRef(str(tiny_policy_dir), key="policy"))
    assert other.snapshot != first.snapshot
    models = loaded_models()
    assert models["policy"] == {"name": str(tiny_policy_dir), "revision": None,
                                "snapshot": other.snapshot}
    assert models["gold.model"]["snapshot"] == first.snapshot  # the second version: gold.model[2]
    assert models["gold.model[2]"]["snapshot"] != first.snapshot
    with pytest.raises(ModelNotFoundError, match="revision 'v1' is set but .* local directory"):
        resolve_model(ModelRef(str(local), "v1", key="gold.model"))


def test_trust_remote_code_is_passed_only_when_the_ref_sets_it(tiny_hub, monkeypatch):
    import transformers

    seen = []
    real = transformers.AutoTokenizer.from_pretrained

    def spy(path, **kwargs):
        seen.append(kwargs["trust_remote_code"])
        return real(path, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
    repo = tiny_hub.ids["gpt2"]
    loading.load_tokenizer(repo)
    loading.load_tokenizer(ModelRef(repo))
    loading.load_tokenizer(ModelRef(repo, trust_remote_code=True))
    assert seen == [False, False, True]


def test_download_patterns_keep_what_transformers_needs():
    files = ["config.json", "generation_config.json", "model.safetensors", "pytorch_model.bin",
             "tokenizer.json", "tokenizer_config.json", "spm.model", "merges.txt", "vocab.json",
             "chat_template.jinja", "modeling_x.py", "README.md", "onnx/model.onnx",
             "onnx/config.json", "flax_model.msgpack", "tf_model.h5", ".gitattributes"]
    assert download_patterns(files) == sorted([
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json", "spm.model", "merges.txt", "vocab.json", "chat_template.jinja"])
    assert "modeling_x.py" in download_patterns(files, trust_remote_code=True)
    bin_only = [f for f in files if not f.endswith(".safetensors")]
    assert "pytorch_model.bin" in download_patterns(bin_only)


def test_online_a_model_not_cached_is_downloaded_with_only_the_files_it_needs(
        tiny_hub, monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    snapshot = tmp_path / "models--org--new" / "snapshots" / ("c" * 40)
    calls = []

    def fake_snapshot_download(repo_id, revision=None, local_files_only=False,
                               allow_patterns=None, **kwargs):
        calls.append((repo_id, revision, local_files_only, allow_patterns))
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        snapshot.mkdir(parents=True)
        (snapshot / "config.json").write_text("{}")
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files",
                        lambda self, repo_id, revision=None: ["config.json", "model.safetensors",
                                                              "pytorch_model.bin", "README.md"])
    m = resolve_model(ModelRef("org/new", "v2", key="policy.base"))
    assert m.path == snapshot and m.snapshot == "c" * 40
    assert calls == [("org/new", "v2", True, ["config.json"]),
                     ("org/new", "v2", False, ["config.json", "model.safetensors"])]
    resolve_model(ModelRef("org/new", "v2", key="policy.base"))
    assert len(calls) == 2  # resolved once per process

    def unreachable(self, repo_id, revision=None):
        raise LocalEntryNotFoundError("Cannot reach the Hub\nsecond line")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", unreachable)
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model(ModelRef("org/other", key="gold.model"))
    assert str(err.value) == ("config key gold.model: hub model 'org/other' (revision 'main') "
                              "could not be downloaded (Cannot reach the Hub); download it "
                              "with: hf download org/other")


def test_the_settings_layer_imports_no_hub_client():
    code = ("import sys, pipeline_lib.settings.config; "
            "print(sorted(m for m in ('huggingface_hub', 'torch', 'transformers') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


# ---------------------------------------------------------------------------------------------
# check_config: syntax only, no file access for hub ids
# ---------------------------------------------------------------------------------------------
def test_hub_ids_are_accepted_at_parse_time_without_any_file():
    cfg = tiny_config(
        policy={"base": "EleutherAI/pythia-410m", "revision": "step143000"},
        sft={"enabled": False},
        gold={"type": "hf", "model": "lvwerra/distilbert-imdb", "label": "POSITIVE"},
        reward_models={"base": "EleutherAI/pythia-70m", "pretrained": [
            {"name": "oa", "model": "OpenAssistant/reward-model-deberta-v3-large-v2",
             "input": "template", "template": "Human: {prompt}\n\nAssistant: {response}"}]},
        prs_compare={"enabled": True, "model": "HuggingFaceTB/SmolLM2-135M-Instruct"},
    )
    s = Settings.from_config(cfg)
    assert s.policy.ref == ModelRef("EleutherAI/pythia-410m", "step143000", False, "policy.base")
    assert s.gold.scorer.ref.key == "gold.model"


@pytest.mark.parametrize("name, ok", [
    ("gpt2", True), ("openai-community/gpt2", True), ("EleutherAI/pythia-70m", True),
    ("org/name.v1_x", True), ("/nonexistent/model", False), ("a/b/c", False),
    ("org--x/name", False), ("org/na..me", False), ("org/name.git", False), ("org/", False),
    ("-org/name", False), ("org/naïve", False), ("", False),
])
def test_hub_id_syntax_follows_huggingface_hub(name, ok):
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    assert is_hub_id(name) is ok
    try:
        validate_repo_id(name)
        theirs = bool(name)
    except HFValidationError:
        theirs = False
    assert theirs is ok


@pytest.mark.parametrize("sections, message", [
    ({"sft": {"enabled": False}}, "config key sft.enabled is false but policy.base is 'scratch'"),
    ({"gold": {"type": "hf"}}, "config key gold.model is required"),
    ({"gold": {"type": "hf", "model": "x//y"}}, "config key gold.model"),
    ({"policy": {"base": "org/na me"}}, "config key policy.base: .* neither 'scratch'"),
    ({"gold": {"type": "hf", "model": "o/m", "input": "template"}}, "gold.template is required"),
    ({"gold": {"type": "hf", "model": "o/m", "input": "template", "template": "{prompt}"}},
     r"gold.template must contain \{response\}"),
    ({"gold": {"type": "hf", "model": "o/m", "input": "template",
               "template": "{title}: {prompt} {response}"}}, r"gold.template names slot \{title\}"),
    ({"gold": {"type": "hf", "model": "o/m", "template": "{prompt} {response}"}},
     "gold.template is set but gold.input is 'concat'"),
    ({"reward_models": {"seeds": [], "pretrained": []}}, "no member"),
    ({"reward_models": {"pretrained": [{"name": "x", "model": "o/m", "input": "template",
                                        "template": "{} {response}"}]}},
     r"reward_models.pretrained\[0\].template names slot \{\}"),
    ({"reward_models": {"seeds": [1], "pretrained": [{"name": "seed1", "model": "o/m"}]}},
     "rm-seed1 is already"),
])
def test_bad_model_settings_are_one_line_naming_the_key(sections, message):
    with pytest.raises(ConfigError, match=message) as err:
        tiny_config(**sections)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("sections, key", [
    ({"policy": {"base": "/nonexistent/model"}}, "policy.base"),
    ({"policy": {"base": "not/a/hub/id"}}, "policy.base"),
    ({"reward_models": {"base": "a/b/c"}}, "reward_models.base"),
    ({"reward_models": {"pretrained": [{"name": "x", "model": "../x/y"}]}},
     "reward_models.pretrained[0].model"),
    ({"prs_compare": {"enabled": True, "model": "/no/such/dir"}}, "prs_compare.model"),
])
def test_a_missing_local_directory_is_planned_then_refused_before_the_first_job(sections, key,
                                                                                tiny_hub):
    """A model written as a path may be made before the run (e.g. a weight diff applied): the
    plan needs no model file; the preflight refuses it, naming the key and the path."""
    s = Settings.from_config(tiny_config(**sections))
    with pytest.raises(ConfigError) as err:
        check_models(s)
    assert f"config key {key}: local model directory" in str(err.value)
    assert "does not exist" in str(err.value)


def test_pretrained_members_alone_make_an_ensemble():
    cfg = tiny_config(reward_models={"seeds": [], "pretrained": [{"name": "oa", "model": "o/m"}]})
    assert Settings.from_config(cfg).reward_models.member_names() == ["rm-oa"]


# ---------------------------------------------------------------------------------------------
# Preflight: every named model resolved and checked from its config before the first job
# ---------------------------------------------------------------------------------------------
def hub_config(hub, **sections) -> Settings:
    """A config naming every tiny model by hub id (SFT off: the Llama chat model is pi_ref)."""
    base = {
        "policy": {"base": hub.ids["llama"]},
        "sft": {"enabled": False},
        "gold": {"type": "hf", "model": hub.ids["distilbert"], "label": "POSITIVE"},
        "reward_models": {"base": hub.ids["pythia"], "pretrained": [
            {"name": "deberta", "model": hub.ids["deberta"], "input": "template",
             "template": "Human: {prompt}\n\nAssistant: {response}"}]},
        "prs_compare": {"enabled": True, "model": hub.ids["gpt2"], "revision": "v1"},
    }
    for name, values in sections.items():
        base[name] = {**base[name], **values}
    return Settings.from_config(tiny_config(**base))


def test_preflight_resolves_every_named_model_to_its_snapshot(tiny_hub):
    from pipeline_lib.stages.preflight import check_models

    resolved = check_models(hub_config(tiny_hub))
    commit = {short: tiny_hub.commits[repo]["main"] for short, repo in tiny_hub.ids.items()}
    assert {k: m.snapshot for k, m in resolved.items()} == {
        "policy.base": commit["llama"],
        "reward_models.base": commit["pythia"],
        "reward_models.pretrained[0].model": commit["deberta"],
        "gold.model": commit["distilbert"],
        "prs_compare.model": tiny_hub.commits[tiny_hub.ids["gpt2"]]["v1"],
    }


@pytest.mark.parametrize("sections, message", [
    ({"gold": {"model": "deberta", "label": None, "output": "probability"}},
     r"config key gold.output: 'probability' of the one-label model .* constant"),
    ({"gold": {"label": "HAPPY"}},
     r"config key gold.label: 'HAPPY' is not a label .* 0: NEGATIVE, 1: POSITIVE"),
    ({"gold": {"label": 2}}, r"config key gold.label: index 2 is out of range"),
    ({"gold": {"input": "chat"}}, r"config key gold.input: input 'chat' needs a chat template"),
    ({"reward_models": {"pretrained": [{"name": "d", "model": "deberta", "label": "POSITIVE"}]}},
     r"reward_models.pretrained\[0\].label: 'POSITIVE' is not a label .* 0: LABEL_0"),
    ({"reward_models": {"input": "chat"}}, "config key reward_models.input: input 'chat'"),
    ({"policy": {"base": "gpt2", "chat_template": True}},
     "policy.chat_template is true but the tokenizer has no chat template"),
])
def test_preflight_refuses_what_the_model_cannot_do(tiny_hub, sections, message):
    from pipeline_lib.stages.preflight import check_models

    for section in sections.values():  # short names -> the tiny hub ids
        for k in ("model", "base"):
            if section.get(k) in tiny_hub.ids:
                section[k] = tiny_hub.ids[section[k]]
        for p in section.get("pretrained", []):
            p["model"] = tiny_hub.ids[p["model"]]
    s = hub_config(tiny_hub, **copy.deepcopy(sections))
    with pytest.raises(ConfigError, match=message) as err:
        check_models(s)
    assert "\n" not in str(err.value)


def test_preflight_lists_every_problem_one_line_each(tiny_hub):
    from pipeline_lib.stages.preflight import check_models

    s = hub_config(tiny_hub, gold={"model": "someone/missing-gold"},
                   reward_models={"base": "someone/missing-base"})
    with pytest.raises(ConfigError) as err:
        check_models(s)
    lines = str(err.value).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("config key reward_models.base: hub model 'someone/missing-base'")
    assert lines[1].endswith("hf download someone/missing-gold")


def test_preflight_cli_prints_each_snapshot(tiny_hub, tmp_path, capsys):
    from pipeline_lib.stages.preflight import main

    cfg = yaml.safe_load(TINY.read_text())
    cfg["policy"] = {**cfg["policy"], "base": tiny_hub.ids["pythia"]}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["--configfile", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"policy.base: {tiny_hub.ids['pythia']} (revision main) snapshot " \
           f"{tiny_hub.commits[tiny_hub.ids['pythia']]['main']}" in out
    cfg["gold"] = {"type": "hf", "model": "someone/missing"}
    path.write_text(yaml.safe_dump(cfg))
    assert main(["--configfile", str(path)]) == 1
    assert "config key gold.model: hub model 'someone/missing'" in capsys.readouterr().err


def test_provenance_records_the_snapshots_of_the_models_loaded(tiny_hub, config):
    from pipeline_lib.stages.common import provenance

    s = Settings.from_config(config)
    assert "models" not in provenance(s, "x")
    loading.load_tokenizer(ModelRef(tiny_hub.ids["llama"], key="policy.base"))
    prov = provenance(s, "x")
    assert prov["models"] == {"policy.base": {
        "name": tiny_hub.ids["llama"], "revision": None,
        "snapshot": tiny_hub.commits[tiny_hub.ids["llama"]]["main"]}}


# ---------------------------------------------------------------------------------------------
# Snakemake: plans without any model file; a real run checks the models before its first job
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_snakemake_plans_hub_models_without_files_and_a_run_stops_before_its_first_job(
        tiny_hub, tmp_path):
    cfg = yaml.safe_load(TINY.read_text())
    cfg["policy"] = {**cfg["policy"], "base": tiny_hub.ids["gpt2"]}
    cfg["gold"] = {"type": "hf", "model": "someone/not-cached", "revision": "v3"}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"),
           "--directory", str(tmp_path), "--configfile", str(path), "--cores", "1"]
    env = {**os.environ, **tiny_hub.env()}
    dry = subprocess.run([*cmd, "-n"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "preflight" not in dry.stdout + dry.stderr
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    out = run.stdout + run.stderr
    assert run.returncode != 0
    assert ("config key gold.model: hub model 'someone/not-cached' (revision 'v3') is not in the "
            "Hugging Face cache") in out
    assert "hf download someone/not-cached --revision v3" in out
    assert not (tmp_path / "results").exists()  # no job ran


def test_hub_add_places_a_local_model_under_a_hub_id(tiny_hub, tiny_policy_dir, capsys):
    """`python -m pipeline_lib.models.hub add DIR ORG/NAME` (offline machines): the model then
    resolves and loads by that id, at the commit the command printed."""
    from pipeline_lib.models.hub import main

    assert main(["add", str(tiny_policy_dir), "someone/my-policy"]) == 0
    commit = capsys.readouterr().out.split(" at ")[1].split()[0]
    resolved = resolve_model(ModelRef("someone/my-policy", None, False, "policy.base"))
    assert resolved.snapshot == commit and resolved.path.name == commit
    model = loading.load_causal_lm("someone/my-policy")
    assert model.config.n_layer == loading.load_causal_lm(tiny_policy_dir).config.n_layer
    assert main(["add", str(tiny_policy_dir / "nope"), "someone/x"]) == 1
    assert main(["add", str(tiny_policy_dir), "not a/valid/id"]) == 1
