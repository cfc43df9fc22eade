"""Alignment method runs: the method families, naming and validation of the ``methods`` list.

A run is one entry of the config's ``methods`` list. Its name (the ``{policy}`` wildcard of
the ``train`` rule) is built from its settings, e.g. ``ppo-b0.05``, ``vbon-n8-exact``,
``bonbon-n8``, ``dpo-n8-b0.1``, unless the entry gives ``name``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline_lib.math.vbon import vbon_beta
from pipeline_lib.settings.errors import ConfigError

PPO_METHODS = ("ppo", "vbon", "bond")  # trained by the PPO trainer
PREFERENCE_METHODS = ("dpo", "ipo", "bonbon", "bon_sft")  # trained on best/worst-of-n pairs
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

@dataclass(frozen=True)
class MethodRun:
    """One validated entry of ``methods`` (defaults filled); ``overrides`` change the trainer's
    settings for this run only."""

    name: str
    method: str
    n: int | None = None
    beta: float | None = None
    bound: str = DEFAULTS["bound"]
    alpha: float = DEFAULTS["alpha"]
    label_smoothing: float = DEFAULTS["label_smoothing"]
    bonbon_variant: str = DEFAULTS["bonbon_variant"]
    w: float = DEFAULTS["w"]
    exact_scale: str = DEFAULTS["exact_scale"]
    overrides: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_ppo(self) -> bool:
        """Trained by the PPO trainer (ppo, vbon, bond)."""
        return self.method in PPO_METHODS

    @property
    def uses_pairs(self) -> bool:
        """Reads a best/worst-of-n pairs table (the preference methods and BOND)."""
        return self.method in PREFERENCE_METHODS or self.method == "bond"

    @property
    def uses_cdf(self) -> bool:
        """Reads the per-prompt reward CDFs (vbon and bond)."""
        return self.method in ("vbon", "bond")

    def as_dict(self) -> dict[str, Any]:
        """The run's settings as a plain dict (provenance, checkpoint guards)."""
        return {**dataclasses.asdict(self), "overrides": dict(self.overrides)}


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


def _check_entry(raw: Mapping[str, Any], where: str, trainer_keys: Mapping[str, set[str]]) -> None:
    m = raw.get("method")
    if m not in METHODS:
        raise ConfigError(f"config key {where}.method: unknown method {m!r}; one of {METHODS}")
    for key in REQUIRED[m]:
        if raw.get(key) is None:
            raise ConfigError(f"config key {where}.{key} is required for method {m!r}")
    known = {f.name for f in dataclasses.fields(MethodRun)} | {"method", "name"}
    for key in sorted(set(raw) - known):
        raise ConfigError(f"config key {where}.{key}: unknown key")
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
    if m in ("vbon", "bond") and (raw.get("overrides") or {}).get("adaptive_kl"):
        raise ConfigError(f"config key {where}.overrides.adaptive_kl: method {m!r} keeps its KL "
                          "coefficient at 1/(n-1); only ppo runs may adapt it")
    allowed = trainer_keys["ppo" if m in PPO_METHODS else "preference"]
    unknown = sorted(set(raw.get("overrides") or {}) - set(allowed))
    if unknown:
        name = "training.ppo" if m in PPO_METHODS else "training.preference"
        raise ConfigError(f"config key {where}.overrides: {unknown} are not keys of {name}")


def method_runs(entries: Sequence[Mapping[str, Any]],
                trainer_keys: Mapping[str, set[str]]) -> dict[str, MethodRun]:
    """Validated runs by name, with defaults filled. ``trainer_keys``: the keys of
    ``training.ppo`` and ``training.preference`` (``{"ppo": ..., "preference": ...}``) that a
    run's ``overrides`` may set. Raises :class:`ConfigError` naming the ``methods[i]`` entry
    and key."""
    runs: dict[str, MethodRun] = {}
    for i, raw in enumerate(entries):
        where = f"methods[{i}]"
        _check_entry(raw, where, trainer_keys)
        spec = {**DEFAULTS, **raw}
        name = run_name(spec)
        if name in runs:
            raise ConfigError(f"config key {where}: run name {name!r} is used twice; give "
                              "one of the entries a distinct `name`")
        if name in ("sft", "reference"):
            raise ConfigError(f"config key {where}.name: {name!r} is reserved")
        spec["name"] = name
        spec["overrides"] = dict(spec.get("overrides") or {})
        runs[name] = MethodRun(**spec)
    return runs


def pair_sizes(runs: Iterable[MethodRun]) -> list[int]:
    """The n of every best/worst-of-n pairs table the runs need."""
    return sorted({int(r.n) for r in runs if r.uses_pairs})


def kl_coefficient(run: MethodRun) -> float:
    """β of the KL penalty: the run's beta for ppo, 1/(n − 1) for vbon and bond."""
    if run.method == "ppo":
        return float(run.beta)
    if run.method in ("vbon", "bond"):
        return vbon_beta(int(run.n))
    raise ValueError(f"method {run.method!r} has no PPO KL coefficient")
