"""The seed papers' recipes (config/recipes/*.yaml): each plans offline with no model file, sets
no key that nothing reads, and runs end to end on tiny stand-ins of the very models and
datasets it names (placed under the recipe's own hub ids), with an override file that changes
sizes only, so every other key of the recipe is exercised as written."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import polars as pl
import pytest
import yaml
from dag_support import job_counts, snakemake_cmd, snakemake_env
from support.recipes import (
    DATASET_STAND_INS,
    MODEL_STAND_INS,
    RECIPES,
    SIZE_KEYS,
    build_recipe_hub,
    leaf_keys,
    named_datasets,
    named_models,
    override_path,
    place_local_models,
    recipe_path,
)

from pipeline_lib.io.tables import read_provenance
from pipeline_lib.settings.config import deep_update, validate_config
from pipeline_lib.settings.inert import inert_keys
from pipeline_lib.settings.sections import Settings

RECIPE_TIMEOUT_S = 900


def recipe(name: str) -> dict:
    return yaml.safe_load(recipe_path(name).read_text())


def settings(raw: dict) -> Settings:
    return Settings.from_config(validate_config(copy.deepcopy(raw)))


def snakemake(workdir: Path, name: str, *args: str, env: dict, override: bool = False,
              timeout: int = RECIPE_TIMEOUT_S) -> subprocess.CompletedProcess:
    files = [recipe_path(name), *([override_path(name)] if override else [])]
    return subprocess.run(snakemake_cmd(workdir, *args, configfile=files), cwd=workdir, env=env,
                          text=True, capture_output=True, timeout=timeout)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_is_valid_and_sets_no_key_that_nothing_reads(name):
    raw = recipe(name)
    assert inert_keys(raw, validate_config(copy.deepcopy(raw))) == []
    s = settings(raw)
    assert s.task == name
    assert named_models(s) <= set(MODEL_STAND_INS), "a model of the recipe has no stand-in"
    assert named_datasets(s) <= set(DATASET_STAND_INS), "a dataset of the recipe has no stand-in"


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_override_changes_sizes_only(name):
    """The tiny run changes no model, dataset, method or hyperparameter of the recipe."""
    override = yaml.safe_load(override_path(name).read_text())
    assert set(leaf_keys(override)) <= SIZE_KEYS, set(leaf_keys(override)) - SIZE_KEYS
    merged = deep_update(recipe(name), override)
    assert inert_keys(merged, validate_config(copy.deepcopy(merged))) == []
    assert settings(merged).methods.keys() == settings(recipe(name)).methods.keys()


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_plans_offline_without_any_model_file(name, tmp_path):
    env = snakemake_env(HF_HOME=str(tmp_path / "empty-hf"), HF_HUB_OFFLINE="1")
    proc = snakemake(tmp_path, name, "-n", env=env, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "has no effect" not in out
    jobs = job_counts(out)
    s = settings(recipe(name))
    if s.default_target == "prs_compare":
        assert jobs["prs_compare"] == 1 and jobs["sample"] == jobs["train"] == 0
    else:
        assert jobs["train"] == len(s.methods)
        assert jobs["summary"] == 1
        assert jobs["sft"] == (1 if s.sft.enabled else 0)
        assert jobs["reward_model"] == len(s.reward_models.seeds)


@pytest.fixture(scope="module")
def recipe_hub(tmp_path_factory):
    return build_recipe_hub(tmp_path_factory.mktemp("recipe-hf"))


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES)
def test_recipe_runs_end_to_end_on_stand_ins(name, recipe_hub, tmp_path):
    place_local_models(recipe_hub, tmp_path)
    env = snakemake_env(**recipe_hub.env())
    proc = snakemake(tmp_path, name, "--cores", "2", env=env, override=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-20000:]
    s = settings(deep_update(recipe(name), yaml.safe_load(override_path(name).read_text())))
    results = tmp_path / "results" / name
    if s.default_target == "prs_compare":
        compare = pl.read_parquet(results / "prs" / "compare.parquet")
        assert set(compare["strategy"]) == {"random", "prs"}
        assert set(compare["N"]) == set(s.prs_compare.ns)
        assert (compare["n_prompts"] == s.prs_compare.n_prompts).all()
        prov = read_provenance(results / "prs" / "compare.parquet")
        assert s.prs_compare.model in str(prov)
        return
    summary = pl.read_parquet(results / "summary.parquet")
    policies = set(summary.filter(pl.col("method") != "bon")["policy"])
    assert set(s.methods) <= policies  # every run of the recipe, by its name
    for run in s.methods.values():
        row = summary.filter(pl.col("policy") == run.name).row(0, named=True)
        assert row["method"] == run.method
        if run.n is not None:
            assert row["n"] == run.n
    assert (summary["temperature"] == s.generation.temperature).all()
    # the models were loaded by the recipe's names, from the stand-ins' snapshots
    prov = str(read_provenance(results / "samples" / "test.parquet"))
    assert s.policy.base in prov or "sft" in prov
