"""Alignment method runs: naming, validation and the sequence rewards of ppo / vbon / bond.

A run is one entry of the config's ``methods`` list. Its name (the ``{policy}`` wildcard of
the ``train`` rule) is built from its settings, e.g. ``ppo-b0.05``, ``vbon-n8-exact``,
``bonbon-n8``, ``dpo-n8-b0.1``, unless the entry gives ``name``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline_lib.config import ConfigError

if TYPE_CHECKING:  # the Snakefile imports this module: keep torch/scipy out of its start-up
    from pipeline_lib.cdf import CurveFit

PPO_METHODS = ("ppo", "vbon", "bond")
PREFERENCE_METHODS = ("dpo", "ipo", "bonbon", "bon_sft")
METHODS = PPO_METHODS + PREFERENCE_METHODS
# settings each method needs (beyond `method`)
REQUIRED = {"ppo": ("beta",), "vbon": ("n",), "bond": ("n",), "dpo": ("n", "beta"),
            "ipo": ("n", "beta"), "bonbon": ("n",), "bon_sft": ("n",)}
# settings that mean nothing for a method (refused, so a typo'd sweep does not silently no-op)
IGNORED = {
    "ppo": ("n", "bound", "alpha", "label_smoothing", "bonbon_variant", "w", "exact_scale"),
    "vbon": ("beta", "alpha", "label_smoothing", "bonbon_variant", "w"),
    "bond": ("beta", "alpha", "label_smoothing", "bonbon_variant"),
    "dpo": ("bound", "alpha", "bonbon_variant", "w", "exact_scale"),
    "ipo": ("bound", "alpha", "label_smoothing", "bonbon_variant", "w", "exact_scale"),
    "bonbon": ("beta", "bound", "label_smoothing", "w", "exact_scale"),
    "bon_sft": ("beta", "bound", "alpha", "label_smoothing", "bonbon_variant", "w",
                "exact_scale"),
}
DEFAULTS = {"bound": "exact", "alpha": 0.005, "label_smoothing": 0.0, "bonbon_variant": "ipo",
            "w": 0.5, "exact_scale": "n_minus_1", "overrides": {}}


def run_name(spec: Mapping[str, Any]) -> str:
    """Default name of a method run from its settings."""
    m = spec["method"]
    if spec.get("name"):
        return str(spec["name"])
    if m == "ppo":
        return f"ppo-b{spec['beta']:g}"
    if m == "vbon":
        return f"vbon-n{spec['n']}-{spec.get('bound', 'exact')}"
    if m == "bond":
        return f"bond-n{spec['n']}-w{spec.get('w', 0.5):g}"
    if m in ("dpo", "ipo"):
        return f"{m}-n{spec['n']}-b{spec['beta']:g}"
    return f"{m}-n{spec['n']}"


def method_runs(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Validated runs by name, with defaults filled. Raises :class:`ConfigError` naming the
    ``methods[i]`` entry and key."""
    runs: dict[str, dict[str, Any]] = {}
    ppo_keys = set(config["training"]["ppo"])
    pref_keys = set(config["training"]["preference"])
    for i, raw in enumerate(config.get("methods") or []):
        where = f"methods[{i}]"
        m = raw.get("method")
        if m not in METHODS:
            raise ConfigError(f"config key {where}.method: unknown method {m!r}; one of {METHODS}")
        for key in REQUIRED[m]:
            if raw.get(key) is None:
                raise ConfigError(f"config key {where}.{key} is required for method {m!r}")
        explicit = {k for k in raw if k not in ("method", "name", "overrides")}
        for key in sorted(explicit & set(IGNORED[m])):
            if raw[key] != DEFAULTS.get(key, object()):
                raise ConfigError(f"config key {where}.{key} has no meaning for method {m!r}")
        if "n" in raw and raw["n"] is not None and int(raw["n"]) < 2:
            raise ConfigError(f"config key {where}.n must be >= 2, got {raw['n']}")
        if "beta" in raw and raw["beta"] is not None and not float(raw["beta"]) > 0:
            raise ConfigError(f"config key {where}.beta must be > 0, got {raw['beta']}")
        if raw.get("bound", "exact") not in ("exact", "l1"):
            raise ConfigError(f"config key {where}.bound must be 'exact' or 'l1'")
        allowed = ppo_keys if m in PPO_METHODS else pref_keys
        unknown = sorted(set(raw.get("overrides") or {}) - allowed)
        if unknown:
            section = "training.ppo" if m in PPO_METHODS else "training.preference"
            raise ConfigError(f"config key {where}.overrides: {unknown} are not keys of {section}")
        spec = {**DEFAULTS, **raw}
        name = run_name(spec)
        if name in runs:
            raise ConfigError(f"config key {where}: run name {name!r} is used twice; give "
                              "one of the entries a distinct `name`")
        if name in ("sft", "reference"):
            raise ConfigError(f"config key {where}.name: {name!r} is reserved")
        runs[name] = spec
    return runs


def pair_sizes(runs: Mapping[str, Mapping[str, Any]]) -> list[int]:
    """The n of every best/worst-of-n pairs table the runs need."""
    return sorted({int(s["n"]) for s in runs.values()
                   if s["method"] in PREFERENCE_METHODS or s["method"] == "bond"})


def kl_coefficient(spec: Mapping[str, Any]) -> float:
    """β of the KL penalty: the run's beta for ppo, 1/(n − 1) for vbon and bond."""
    from pipeline_lib.objectives import vbon_beta

    if spec["method"] == "ppo":
        return float(spec["beta"])
    if spec["method"] in ("vbon", "bond"):
        return vbon_beta(int(spec["n"]))
    raise ValueError(f"method {spec['method']!r} has no PPO KL coefficient")


# ---------------------------------------------------------------------------------------------
# vBoN sequence rewards from the per-prompt cache (pure numpy)
# ---------------------------------------------------------------------------------------------
def cache_counts(sorted_rows: np.ndarray, rewards: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """#{cached < r} and #{cached <= r} for each query, against its own prompt's sorted row.

    ``sorted_rows``: (B, M) — the cached rewards of each query's prompt, ascending.
    """
    s = np.asarray(sorted_rows, dtype=np.float64)
    r = np.asarray(rewards, dtype=np.float64)[:, None]
    return (s < r).sum(axis=1), (s <= r).sum(axis=1)


def vbon_rewards(
    sorted_rows: np.ndarray,
    rewards: np.ndarray,
    n: int,
    bound: str,
    exact_scale: str = "n_minus_1",
    fits: list[CurveFit | None] | None = None,
) -> np.ndarray:
    """The vBoN sequence reward of fresh policy samples with proxy rewards ``rewards``.

    * ``l1``: log F̂(r), F̂(r) = (1 + #{cached < r}) / (M + 1) — or the prompt's fitted
      log-CDF where ``fits`` has a successful curve fit (vBoN ``--curvefit``), clipped to
      [log 1/(M+1), 0] like F̂.
    * ``exact``: (1/(n−1))·log(π_BoN/π_ref) with the tie-aware form
      [Fⁿ − F⁻ⁿ]/[F − F⁻], where the fresh sample is counted as one of M + 1 draws
      (F⁻ = #{cached < r}/(M+1), F = (#{cached <= r} + 1)/(M+1)) — the same smoothing as F̂,
      so the reward is finite for a response below every cached one. ``exact_scale="n"``
      uses the vBoN code's 1/n scale instead of 1/(n−1).
    """
    from pipeline_lib.objectives import vbon_reward_exact, vbon_reward_l1

    s = np.asarray(sorted_rows, dtype=np.float64)
    m = s.shape[1]
    below, at_or_below = cache_counts(s, rewards)
    if bound == "l1":
        reward = vbon_reward_l1((1.0 + below) / (m + 1.0))
        if fits is not None:
            floor = -np.log(m + 1.0)  # the smoothed empirical CDF's floor, log 1/(M+1)
            for i, fit in enumerate(fits):
                if fit is not None and fit.ok:
                    fitted = float(fit.log_cdf(np.asarray([rewards[i]]))[0])
                    reward[i] = min(max(fitted, floor), 0.0)
        return reward
    if bound == "exact":
        return vbon_reward_exact(below / (m + 1.0), (at_or_below + 1.0) / (m + 1.0), n,
                                 scale=exact_scale)
    raise ValueError(f"bound must be 'exact' or 'l1', got {bound!r}")
