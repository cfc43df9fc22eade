"""Sweeps of the ``methods`` list (lists of knobs, training seeds), the per-run proxy objective
of ppo runs and ``beta: 0`` for ppo."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline_lib.math.seeding import derive_seed
from pipeline_lib.settings.config import validate_config
from pipeline_lib.settings.errors import ConfigError
from pipeline_lib.settings.methods import (
    expand_entries,
    kl_coefficient,
    method_runs,
    proxy_objective,
    training_seed,
)
from pipeline_lib.settings.sections import Settings

KEYS = {"ppo": {"adaptive_kl", "steps"}, "preference": {"epochs"}}


def runs(entries, **kw):
    return method_runs(entries, KEYS, **kw)


def test_expansion_is_the_cartesian_product_in_knob_order_seed_fastest():
    ex = expand_entries([{"method": "dpo", "beta": [0.1, 0.3], "n": [8, 4], "seeds": [1, 0]}])
    assert [(e.spec["n"], e.spec["beta"], e.seed) for e in ex] == [
        (8, 0.1, 1), (8, 0.1, 0), (8, 0.3, 1), (8, 0.3, 0),
        (4, 0.1, 1), (4, 0.1, 0), (4, 0.3, 1), (4, 0.3, 0)]
    assert {e.swept for e in ex} == {("n", "beta")} and {e.index for e in ex} == {0}
    assert "seeds" not in ex[0].spec
    # no lists, no seeds: the entry itself
    (one,) = expand_entries([{"method": "ppo", "beta": 0.05}])
    assert one.spec == {"method": "ppo", "beta": 0.05} and one.swept == () and one.seed is None


def test_sweep_names_groups_and_knobs():
    r = runs([{"method": "vbon", "n": [2, 4, 8]},
              {"method": "ppo", "beta": [0.01, 0.1]},
              {"name": "mine", "method": "bonbon", "n": [4, 8]},
              {"method": "bonbon", "n": 8, "alpha": [0.005, 0.05]},
              {"method": "vbon", "n": [16, 32]},
              {"method": "bond", "n": 8}])
    assert list(r) == ["vbon-n2-exact", "vbon-n4-exact", "vbon-n8-exact", "ppo-b0.01", "ppo-b0.1",
                       "mine-n4", "mine-n8", "bonbon-n8-a0.005", "bonbon-n8-a0.05",
                       "vbon-n16-exact", "vbon-n32-exact", "bond-n8-w0.5"]
    sweeps = {name: (run.sweep, run.knob, run.knob_value) for name, run in r.items()}
    assert sweeps["vbon-n4-exact"] == ("vbon-exact", "n", 4)
    assert sweeps["ppo-b0.1"] == ("ppo", "beta", 0.1)
    assert sweeps["mine-n8"] == ("mine", "n", 8)
    assert sweeps["bonbon-n8-a0.05"] == ("bonbon-n8", "alpha", 0.05)
    # another entry with the same stem gets its own sweep
    assert sweeps["vbon-n16-exact"] == ("vbon-exact-e4", "n", 16)
    # no list: a sweep of one, no knob
    assert sweeps["bond-n8-w0.5"] == ("bond-n8-w0.5", None, None)


def test_seeds_repeat_runs_with_stable_names_and_distinct_training_seeds():
    r = runs([{"method": "vbon", "n": [4, 8], "seeds": [0, 1]},
              {"method": "ppo", "beta": 0.05}], seeds=[7])
    assert list(r) == ["vbon-n4-exact-s0", "vbon-n4-exact-s1", "vbon-n8-exact-s0",
                       "vbon-n8-exact-s1", "ppo-b0.05-s7"]  # training.seeds: the default
    a, b = r["vbon-n8-exact-s0"], r["vbon-n8-exact-s1"]
    assert (a.seed, b.seed, a.base_name, a.sweep) == (0, 1, "vbon-n8-exact", "vbon-exact")
    assert training_seed(0, a) != training_seed(0, b)
    assert training_seed(0, a) != training_seed(0, r["vbon-n4-exact-s0"])
    # the same seed of the same setting trains the same, whichever other seeds are listed
    again = runs([{"method": "vbon", "n": 8, "seeds": [3, 1]}])["vbon-n8-exact-s1"]
    assert training_seed(0, again) == training_seed(0, b)
    # a run without seeds keeps the training seed it always had
    plain = runs([{"method": "vbon", "n": 8}])["vbon-n8-exact"]
    assert plain.seed is None and training_seed(5, plain) == derive_seed(5, "train",
                                                                         "vbon-n8-exact")
    # an entry's own seeds win over training.seeds; seeds: null opts out
    r = runs([{"method": "ppo", "beta": 0.1, "seeds": None}, {"method": "ppo", "beta": 0.2,
                                                              "seeds": [2]}], seeds=[0, 1])
    assert list(r) == ["ppo-b0.1", "ppo-b0.2-s2"]
    named = runs([{"name": "x", "method": "ppo", "beta": [0, 0.1], "seeds": [1]}])
    assert list(named) == ["x-b0-s1", "x-b0.1-s1"]


def test_as_dict_records_settings_not_labels():
    r = runs([{"method": "ppo", "beta": [0.01], "objective": "uwo", "uwo_lambda": 0.1,
               "seeds": [2]}])
    d = r["ppo-b0.01-uwo0.1-s2"].as_dict()
    assert d["objective"] == "uwo" and d["uwo_lambda"] == 0.1 and d["seed"] == 2
    assert "sweep" not in d and "knob" not in d
    # a run that sets none of the new keys keeps its old provenance
    d = runs([{"method": "vbon", "n": 8}])["vbon-n8-exact"].as_dict()
    assert not {"seed", "objective", "uwo_lambda", "sweep", "knob"} & set(d)


@pytest.mark.parametrize("entry, message", [
    ({"method": "ppo", "beta": []}, r"methods\[0\]\.beta: an empty list"),
    ({"method": "vbon", "n": [4, 8, 4]}, r"methods\[0\]\.n lists 4 twice"),
    ({"method": ["ppo", "vbon"], "beta": 0.1}, r"methods\[0\]\.method: a list is not allowed"),
    ({"method": "ppo", "name": ["a", "b"], "beta": 0.1},
     r"methods\[0\]\.name: a list is not allowed"),
    ({"method": "ppo", "beta": 0.1, "seeds": []}, r"methods\[0\]\.seeds: an empty list"),
    ({"method": "ppo", "beta": 0.1, "seeds": [1, 1]}, r"methods\[0\]\.seeds lists 1 twice"),
    ({"method": "ppo", "beta": 0.1, "seeds": 3}, r"methods\[0\]\.seeds must be a list"),
    ({"method": "vbon", "n": [1, 4]}, r"methods\[0\]\.n must be >= 2, got 1"),
    ({"method": "ppo", "beta": [0.1], "n": [4]}, r"methods\[0\]\.n has no meaning"),
    ({"method": "vbon", "n": 8, "objective": "wco"}, r"methods\[0\]\.objective: .*ppo runs only"),
    ({"method": "bond", "n": 8, "uwo_lambda": 1.0}, r"methods\[0\]\.uwo_lambda: .*ppo runs only"),
    ({"method": "ppo", "beta": 0.1, "objective": "median"}, r"methods\[0\]\.objective must be"),
    ({"method": "ppo", "beta": 0.1, "objective": "wco", "uwo_lambda": 1.0},
     r"methods\[0\]\.uwo_lambda has no meaning"),
    ({"method": "ppo", "beta": 0.1, "objective": ["mean", "uwo"], "uwo_lambda": [0.1, 1]},
     r"methods\[0\]\.uwo_lambda: a list of λ"),
    ({"method": "dpo", "n": 8, "beta": 0}, r"methods\[0\]\.beta must be > 0 for method 'dpo'"),
    ({"method": "ipo", "n": 8, "beta": [0.1, 0]}, r"methods\[0\]\.beta must be > 0"),
    ({"method": "ppo", "beta": 0, "overrides": {"adaptive_kl": True}},
     r"methods\[0\]\.beta: 0 cannot adapt"),
    ({"method": "ppo", "beta": [0.1, 0.1000001]}, "used twice"),
])
def test_errors_name_the_entry_and_key(entry, message):
    with pytest.raises(ConfigError, match=message):
        runs([entry])


def test_beta_zero_is_ppo_without_kl_penalty():
    r = runs([{"method": "ppo", "beta": 0}])["ppo-b0"]
    assert kl_coefficient(r) == 0.0
    with pytest.raises(ConfigError, match="cannot adapt"):  # training.ppo.adaptive_kl
        runs([{"method": "ppo", "beta": 0}], adaptive_kl=True)
    # the run opts out of the adaptive coefficient
    runs([{"method": "ppo", "beta": 0, "overrides": {"adaptive_kl": False}}], adaptive_kl=True)


def test_ppo_objective_defaults_to_cdf_and_is_named_when_it_differs():
    cdf = SimpleNamespace(objective="mean", uwo_lambda=0.5)
    r = runs([{"method": "ppo", "beta": 0.01},
              {"method": "ppo", "beta": 0.01, "objective": "uwo", "uwo_lambda": 0.1},
              {"method": "ppo", "beta": 0, "objective": "wco"},
              {"method": "ppo", "beta": 0.1, "objective": ["mean", "wco", "uwo"]},
              {"method": "ppo", "beta": 0.1, "objective": "uwo", "uwo_lambda": [0.1, 1]},
              {"method": "vbon", "n": 8}])
    assert list(r) == ["ppo-b0.01", "ppo-b0.01-uwo0.1", "ppo-b0-wco", "ppo-b0.1-mean",
                       "ppo-b0.1-wco", "ppo-b0.1-uwo0.5", "ppo-b0.1-uwo0.1", "ppo-b0.1-uwo1",
                       "vbon-n8-exact"]
    assert r["ppo-b0.1-wco"].sweep == "ppo-b0.1" and r["ppo-b0.1-wco"].knob == "objective"
    assert r["ppo-b0.1-uwo1"].sweep == "ppo-b0.1-uwo"
    assert r["ppo-b0.1-uwo1"].knob == "uwo_lambda"
    assert proxy_objective(r["ppo-b0.01"], cdf) == ("mean", 0.5)
    assert proxy_objective(r["ppo-b0.01-uwo0.1"], cdf) == ("uwo", 0.1)
    assert proxy_objective(r["ppo-b0-wco"], cdf) == ("wco", 0.5)
    assert proxy_objective(r["vbon-n8-exact"], cdf) == ("mean", 0.5)  # vbon: cdf's
    assert r["vbon-n8-exact"].objective is None
    # under cdf uwo, a ppo run at cdf's λ is not renamed; another λ is
    r = runs([{"method": "ppo", "beta": 0.05}, {"method": "ppo", "beta": 0.05,
                                                "uwo_lambda": 2.0}],
             objective="uwo", uwo_lambda=0.5)
    assert list(r) == ["ppo-b0.05", "ppo-b0.05-uwo2"]
    assert (r["ppo-b0.05"].objective, r["ppo-b0.05"].uwo_lambda) == ("uwo", 0.5)


def test_settings_expand_the_config_sweeps(config):
    cfg = copy.deepcopy(config)
    cfg["training"]["seeds"] = [0, 1]
    cfg["methods"] = [{"method": "ppo", "beta": [0, 0.1], "objective": "wco", "seeds": None},
                      {"method": "vbon", "n": [4, 8], "bound": ["exact", "l1"]},
                      {"method": "dpo", "n": 4, "beta": [0.1]}]
    s = Settings.from_config(validate_config(cfg))
    assert list(s.methods) == [
        "ppo-b0-wco", "ppo-b0.1-wco",
        "vbon-n4-exact-s0", "vbon-n4-exact-s1", "vbon-n4-l1-s0", "vbon-n4-l1-s1",
        "vbon-n8-exact-s0", "vbon-n8-exact-s1", "vbon-n8-l1-s0", "vbon-n8-l1-s1",
        "dpo-n4-b0.1-s0", "dpo-n4-b0.1-s1"]
    v = s.methods["vbon-n8-l1-s1"]
    assert (v.sweep, v.knob, v.knob_value, v.seed) == ("vbon", "n+bound", (8, "l1"), 1)
    assert s.training.seeds == (0, 1)
    for bad, message in [
        ({"method": "ppo", "beta": -0.1}, "minimum"),
        ({"method": "vbon", "n": 8, "bound": "l2"}, "'l2' is not one of"),
        ({"method": "vbon", "n": 8, "bound": ["exact", "l2"]}, "'l2' is not one of"),
        ({"method": "ppo", "beta": 0.1, "objective": "median"}, "'median' is not one of"),
        ({"method": "dpo", "n": 8, "beta": 0}, r"methods\[0\]\.beta must be > 0"),
    ]:
        cfg["methods"] = [bad]
        with pytest.raises(Exception, match=message):
            validate_config(copy.deepcopy(cfg))


def test_the_ppo_proxy_uses_the_runs_objective(config, monkeypatch):
    """The proxy a wco ppo run trains on is the minimum over the members (cdf says uwo)."""
    from pipeline_lib.stages import reward_cache
    from pipeline_lib.stages.train import run_proxy

    members = {"rm-a": np.array([1.0, -2.0, 0.5]), "rm-b": np.array([0.0, 3.0, 0.7])}

    class Fake:
        def __init__(self, name):
            self.name = name

        def score(self, prompts, responses):
            return members[self.name][: len(responses)]

    monkeypatch.setattr(reward_cache, "member_settings",
                        lambda rm, dirs: [SimpleNamespace(name=n) for n in sorted(dirs)])
    monkeypatch.setattr(reward_cache, "reward_model_scorer",
                        lambda m, device, batch_size=256: Fake(m.name))
    cfg = copy.deepcopy(config)
    cfg["cdf"].update(objective="uwo", uwo_lambda=0.5, normalize=False)
    cfg["methods"] = [{"method": "ppo", "beta": 0, "objective": "wco"},
                      {"method": "ppo", "beta": 0, "objective": "uwo", "uwo_lambda": 2.0},
                      {"method": "ppo", "beta": 0.1},
                      {"method": "vbon", "n": 4}]
    s = Settings.from_config(validate_config(cfg))
    dirs = {"rm-a": "a", "rm-b": "b"}
    texts = ["p"] * 3, ["r"] * 3
    m = np.stack(list(members.values()))

    def score(name):
        return run_proxy(s, s.methods[name], dirs, None, "cpu").score(*texts)

    np.testing.assert_allclose(score("ppo-b0-wco"), m.min(axis=0))
    np.testing.assert_allclose(score("ppo-b0-uwo2"), m.mean(axis=0) - 2.0 * m.var(axis=0))
    for name in ("ppo-b0.1", "vbon-n4-exact"):  # cdf's objective
        np.testing.assert_allclose(score(name), m.mean(axis=0) - 0.5 * m.var(axis=0))


def test_a_beta_zero_ppo_run_gets_a_valid_trainer_config(config):
    from pipeline_lib.stages.train import ppo_config

    cfg = copy.deepcopy(config)
    cfg["methods"] = [{"method": "ppo", "beta": 0}]
    s = Settings.from_config(validate_config(cfg))
    c = ppo_config(s, s.methods["ppo-b0"])
    assert c.kl_coef == 0.0 and not c.adaptive_kl
    cfg["training"]["ppo"]["adaptive_kl"] = True
    with pytest.raises(ConfigError, match=r"methods\[0\]\.beta: 0 cannot adapt"):
        validate_config(copy.deepcopy(cfg))
