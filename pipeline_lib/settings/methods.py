"""Alignment method runs: the method families, naming and validation of the ``methods`` list.

A run is one entry of the config's ``methods`` list, or one point of the sweep an entry
describes. Its name (the ``{policy}`` wildcard of the ``train`` rule) is built from its
settings, e.g. ``ppo-b0.05``, ``vbon-n8-exact``, ``bonbon-n8``, ``dpo-n8-b0.1``, unless the
entry gives ``name``.

Sweeps: a knob of :data:`SWEEPABLE` given as a list expands to one run per value (the
Cartesian product over the entry's list-valued knobs, knobs in :data:`SWEEPABLE` order, values
in the order written), and ``seeds`` (training seeds; default ``training.seeds``) repeats each
run once per seed, the seed innermost::

    methods:
      - {method: vbon, n: [2, 4, 8]}          # vbon-n2-exact, vbon-n4-exact, vbon-n8-exact
      - {method: ppo, beta: [0.01, 0.1], seeds: [0, 1]}
        # ppo-b0.01-s0, ppo-b0.01-s1, ppo-b0.1-s0, ppo-b0.1-s1
      - {name: mine, method: dpo, n: 8, beta: [0.1, 0.3]}  # mine-b0.1, mine-b0.3

Each run records the sweep it belongs to (:attr:`MethodRun.sweep`, :attr:`MethodRun.knob`) and
its seed, so that later stages can group the runs of a sweep and average over seeds.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline_lib.math.seeding import derive_seed
from pipeline_lib.math.vbon import vbon_beta
from pipeline_lib.settings.errors import ConfigError

PPO_METHODS = ("ppo", "vbon", "bond")  # trained by the PPO trainer
PREFERENCE_METHODS = ("dpo", "ipo", "bonbon", "bon_sft")  # trained on best/worst-of-n pairs
METHODS = PPO_METHODS + PREFERENCE_METHODS
OBJECTIVES = ("mean", "wco", "uwo")  # ensemble objectives of the proxy (math.ensembles)

# settings each method needs (beyond `method`)
REQUIRED = {"ppo": ("beta",), "vbon": ("n",), "bond": ("n",), "dpo": ("n", "beta"),
            "ipo": ("n", "beta"), "bonbon": ("n",), "bon_sft": ("n",)}

# settings that mean nothing for a method (refused, so a typo'd sweep does not silently no-op)
_PROXY = ("objective", "uwo_lambda")  # per-run proxy objective: ppo only (vbon/bond read CDFs)
IGNORED = {
    "ppo": ("n", "bound", "alpha", "label_smoothing", "bonbon_variant", "w", "exact_scale"),
    "vbon": ("beta", "alpha", "label_smoothing", "bonbon_variant", "w", *_PROXY),
    "bond": ("beta", "alpha", "label_smoothing", "bonbon_variant", *_PROXY),
    "dpo": ("bound", "alpha", "bonbon_variant", "w", "exact_scale", *_PROXY),
    "ipo": ("bound", "alpha", "label_smoothing", "bonbon_variant", "w", "exact_scale", *_PROXY),
    "bonbon": ("beta", "bound", "label_smoothing", "w", "exact_scale", *_PROXY),
    "bon_sft": ("beta", "bound", "alpha", "label_smoothing", "bonbon_variant", "w",
                "exact_scale", *_PROXY),
}

DEFAULTS = {"bound": "exact", "alpha": 0.005, "label_smoothing": 0.0, "bonbon_variant": "ipo",
            "w": 0.5, "exact_scale": "n_minus_1", "overrides": {}}

# the knobs an entry may give as a list (one run per value), in expansion and naming order
SWEEPABLE = ("n", "beta", "bound", "w", "alpha", "label_smoothing", "bonbon_variant",
             "exact_scale", "objective", "uwo_lambda")
# keys of an entry that are not settings of the run: never swept
_FIXED = ("method", "name", "overrides")
# the settings in each method's default name (after the method)
NAME_KEYS = {"ppo": ("beta", "objective"), "vbon": ("n", "bound"), "bond": ("n", "w"),
             "dpo": ("n", "beta"), "ipo": ("n", "beta"), "bonbon": ("n",), "bon_sft": ("n",)}
# labels of a run, not settings: left out of as_dict (provenance, the train rule's params)
_LABELS = ("sweep", "knob")


@dataclass(frozen=True)
class MethodRun:
    """One validated run of ``methods`` (defaults filled); ``overrides`` change the trainer's
    settings for this run only.

    ``objective`` / ``uwo_lambda``: the ensemble objective of the proxy a ppo run trains on
    (the entry's, else ``cdf.objective`` / ``cdf.uwo_lambda``; λ only for ``uwo``); None for
    the other methods (vbon and bond train on ``cdf.objective``, the objective of their CDFs).
    ``seed``: the training seed of a run of an entry with ``seeds`` (None without).
    ``sweep``: the sweep the run belongs to (the runs of one entry share it; different entries
    have different sweeps); ``knob``: the key swept in it (``"n"``, ``"beta"``, several joined
    by ``+``), None when the entry gives no list."""

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
    objective: str | None = None
    uwo_lambda: float | None = None
    seed: int | None = None
    sweep: str = ""
    knob: str | None = None

    def __post_init__(self) -> None:
        if not self.sweep:  # a run built by hand is a sweep of its own
            object.__setattr__(self, "sweep", self.name)

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

    @property
    def base_name(self) -> str:
        """The name without the seed suffix (``vbon-n8-exact`` for ``vbon-n8-exact-s1``): the
        runs that differ only by their seed share it."""
        suffix = f"-s{self.seed}"
        if self.seed is not None and self.name.endswith(suffix):
            return self.name[: -len(suffix)]
        return self.name

    @property
    def knob_value(self) -> Any:
        """The value of the swept knob (a tuple when several are swept); None without one."""
        if self.knob is None:
            return None
        values = tuple(getattr(self, k) for k in self.knob.split("+"))
        return values[0] if len(values) == 1 else values

    def as_dict(self) -> dict[str, Any]:
        """The run's settings as a plain dict (provenance, checkpoint guards, the train rule's
        params). The labels ``sweep`` and ``knob`` are left out (renaming a sweep retrains
        nothing), and so are ``seed``, ``objective`` and ``uwo_lambda`` while None, so a run
        that sets none of them keeps the settings it had before they existed."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in _LABELS}
        for key in ("seed", "objective", "uwo_lambda"):
            if d[key] is None:
                del d[key]
        return {**d, "overrides": dict(self.overrides)}


@dataclass(frozen=True)
class Expanded:
    """One run of an entry of ``methods``: ``spec``, the entry with one value per knob (no
    ``seeds``); ``swept``, its list-valued knobs (in :data:`SWEEPABLE` order); ``seed``, its
    training seed (None without ``seeds``); ``index``, the entry's position."""

    index: int
    spec: dict[str, Any]
    swept: tuple[str, ...]
    seed: int | None


def _seed_list(value: Any, key: str) -> list[int] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value):
        raise ConfigError(f"config key {key} must be a list of integers >= 0, got {value!r}")
    _check_list(list(value), key)
    return [int(s) for s in value]


def _check_list(values: list[Any], key: str) -> None:
    if not values:
        raise ConfigError(f"config key {key}: an empty list sweeps nothing; give at least one "
                          "value")
    for i, v in enumerate(values):
        if v in values[:i]:
            raise ConfigError(f"config key {key} lists {v!r} twice")


def expand_entries(entries: Sequence[Mapping[str, Any]],
                   default_seeds: Sequence[int] | None = None) -> list[Expanded]:
    """The runs the ``methods`` entries describe: each list-valued knob of :data:`SWEEPABLE`
    expands to one run per value (the Cartesian product over an entry's lists, knobs in
    :data:`SWEEPABLE` order, values as written), and ``seeds`` (else ``default_seeds``, i.e.
    ``training.seeds``; ``seeds: null`` opts out) repeats each, the seed varying fastest.
    Pure: validates only the lists, raising :class:`ConfigError` naming ``methods[i].<key>``
    (an empty list, a value listed twice, a list on a key that cannot be swept)."""
    default = _seed_list(list(default_seeds) if default_seeds is not None else None,
                         "training.seeds")
    out: list[Expanded] = []
    for i, raw in enumerate(entries):
        where = f"methods[{i}]"
        if not isinstance(raw, Mapping):
            raise ConfigError(f"config key {where} must be a mapping, got {type(raw).__name__}")
        for key in _FIXED:
            if isinstance(raw.get(key), (list, tuple)):
                raise ConfigError(f"config key {where}.{key}: a list is not allowed here; only "
                                  f"{', '.join(SWEEPABLE)} may be swept (give one entry each)")
        swept = tuple(k for k in SWEEPABLE if isinstance(raw.get(k), (list, tuple)))
        for key in swept:
            _check_list(list(raw[key]), f"{where}.{key}")
        seeds = _seed_list(raw["seeds"], f"{where}.seeds") if "seeds" in raw else default
        base = {k: v for k, v in raw.items() if k != "seeds" and k not in swept}
        for values in itertools.product(*(list(raw[k]) for k in swept)):
            spec = {**base, **dict(zip(swept, values, strict=True))}
            for seed in seeds if seeds is not None else [None]:
                out.append(Expanded(i, dict(spec), swept, seed))
    return out


def _part(key: str, spec: Mapping[str, Any]) -> str:
    """The name part of one knob (``uwo_lambda`` is part of the objective's)."""
    v = spec.get(key, DEFAULTS.get(key))
    if key in ("objective", "uwo_lambda"):
        obj = spec["objective"]
        return f"uwo{float(spec['uwo_lambda']):g}" if obj == "uwo" else str(obj)
    prefix = {"n": "n", "beta": "b", "w": "w", "alpha": "a", "label_smoothing": "ls"}
    if key == "n":
        return f"n{int(v)}"
    if key in prefix:
        return f"{prefix[key]}{float(v):g}"
    if key == "exact_scale":
        return "scale_nm1" if v == "n_minus_1" else f"scale_{v}"
    return str(v)  # bound, bonbon_variant


def _slot(key: str) -> str:
    return "objective" if key == "uwo_lambda" else key


def _shows_objective(spec: Mapping[str, Any], swept: Sequence[str],
                     default_objective: tuple[str, float | None]) -> bool:
    """A ppo run names its objective when it is swept or differs from cdf's."""
    if spec.get("method") != "ppo" or spec.get("objective") is None:
        return False
    own = (spec["objective"], spec.get("uwo_lambda") if spec["objective"] == "uwo" else None)
    return bool({"objective", "uwo_lambda"} & set(swept)) or own != default_objective


def run_name(spec: Mapping[str, Any], swept: Sequence[str] = (), seed: int | None = None,
             default_objective: tuple[str, float | None] | None = None) -> str:
    """Name of a method run from its settings: the entry's ``name`` or the method's default
    (``ppo-b0.05``, ``vbon-n8-exact``, ``bond-n8-w0.5``, ``dpo-n8-b0.1``, ``bonbon-n8``), then
    a part for each swept knob the name does not show yet (``mine-n8``, ``bonbon-n8-a0.05``)
    and ``-s<seed>`` for a run of an entry with ``seeds``. A ppo run whose proxy objective
    differs from ``default_objective`` (cdf's ``(objective, λ or None)``; None: the schema's
    ``("mean", None)``) or is swept shows it (``ppo-b0.01-wco``, ``ppo-b0-uwo0.1``)."""
    m = spec["method"]
    shown = NAME_KEYS[m] if not spec.get("name") else ()
    show_obj = _shows_objective(spec, swept, default_objective or ("mean", None))
    slots = [k for k in shown if k != "objective" or show_obj]
    slots += [s for s in dict.fromkeys(map(_slot, swept)) if s not in slots]
    head = str(spec["name"]) if spec.get("name") else m
    name = "-".join([head, *(_part(k, spec) for k in slots)])
    return name if seed is None else f"{name}-s{seed}"


def _sweep_stem(spec: Mapping[str, Any], swept: Sequence[str],
                default_objective: tuple[str, float | None]) -> str:
    """The run's name without its swept parts (and seed): ``vbon-exact``, ``ppo``, the name."""
    if spec.get("name"):
        return str(spec["name"])
    m = spec["method"]
    slots = set(map(_slot, swept))
    parts = [m]
    for k in NAME_KEYS[m]:
        if k == "objective":
            if not _shows_objective(spec, swept, default_objective):
                continue
            if "objective" in swept:
                continue
            if "uwo_lambda" in swept:  # only λ varies: the sweep is over the UWO objective
                parts.append("uwo")
                continue
        elif k in slots:
            continue
        parts.append(_part(k, spec))
    return "-".join(parts)


def _check_entry(raw: Mapping[str, Any], where: str, trainer_keys: Mapping[str, set[str]],
                 adaptive_kl: bool = False) -> None:
    m = raw.get("method")
    if m not in METHODS:
        raise ConfigError(f"config key {where}.method: unknown method {m!r}; one of {METHODS}")
    for key in REQUIRED[m]:
        if raw.get(key) is None:
            raise ConfigError(f"config key {where}.{key} is required for method {m!r}")
    known = set(SWEEPABLE) | set(DEFAULTS) | set(_FIXED) | {"seeds"}
    for key in sorted(set(raw) - known):
        raise ConfigError(f"config key {where}.{key}: unknown key")
    explicit = {k for k in raw if k not in (*_FIXED, "seeds")}
    for key in sorted(explicit & set(IGNORED[m])):
        if key in _PROXY:
            raise ConfigError(
                f"config key {where}.{key}: a per-run proxy objective is for ppo runs only; "
                f"method {m!r} reads rewards built with cdf.objective (set cdf.{key})")
        if raw[key] != DEFAULTS.get(key, object()):
            raise ConfigError(f"config key {where}.{key} has no meaning for method {m!r}")
    if "n" in raw and raw["n"] is not None and int(raw["n"]) < 2:
        raise ConfigError(f"config key {where}.n must be >= 2, got {raw['n']}")
    beta = raw.get("beta")
    if beta is not None:
        if not math.isfinite(float(beta)) or float(beta) < 0:
            raise ConfigError(f"config key {where}.beta must be a finite number >= 0, got {beta}")
        if m != "ppo" and not float(beta) > 0:
            raise ConfigError(f"config key {where}.beta must be > 0 for method {m!r}, got "
                              f"{beta} (beta: 0, no KL penalty, is for ppo runs only)")
        if m == "ppo" and float(beta) == 0 and (raw.get("overrides") or {}).get(
                "adaptive_kl", adaptive_kl):
            raise ConfigError(f"config key {where}.beta: 0 cannot adapt (adaptive_kl scales the "
                              "coefficient); give this run overrides: {adaptive_kl: false}")
    if raw.get("bound", "exact") not in ("exact", "l1"):
        raise ConfigError(f"config key {where}.bound must be 'exact' or 'l1'")
    if raw.get("objective") is not None and raw["objective"] not in OBJECTIVES:
        raise ConfigError(f"config key {where}.objective must be one of {OBJECTIVES}, got "
                          f"{raw['objective']!r}")
    lam = raw.get("uwo_lambda")
    if lam is not None and not (math.isfinite(float(lam)) and float(lam) >= 0):
        raise ConfigError(f"config key {where}.uwo_lambda must be a finite number >= 0, got {lam}")
    if m in ("vbon", "bond") and (raw.get("overrides") or {}).get("adaptive_kl"):
        raise ConfigError(f"config key {where}.overrides.adaptive_kl: method {m!r} keeps its KL "
                          "coefficient at 1/(n-1); only ppo runs may adapt it")
    allowed = trainer_keys["ppo" if m in PPO_METHODS else "preference"]
    unknown = sorted(set(raw.get("overrides") or {}) - set(allowed))
    if unknown:
        name = "training.ppo" if m in PPO_METHODS else "training.preference"
        raise ConfigError(f"config key {where}.overrides: {unknown} are not keys of {name}")


def _check_objective_lists(raw: Mapping[str, Any], where: str, default_objective: str) -> None:
    """``uwo_lambda`` only where some objective of the entry is ``uwo``; a list of λ only when
    every objective is (else the mean / wco runs would repeat)."""
    if raw.get("method") != "ppo" or "uwo_lambda" not in raw:
        return
    objs = raw.get("objective", default_objective)
    objs = list(objs) if isinstance(objs, (list, tuple)) else [objs]
    if "uwo" not in objs:
        source = "" if "objective" in raw else " (cdf.objective)"
        raise ConfigError(f"config key {where}.uwo_lambda has no meaning: the run's objective "
                          f"is {objs[0]!r}{source}, not 'uwo'")
    if isinstance(raw["uwo_lambda"], (list, tuple)) and set(objs) != {"uwo"}:
        raise ConfigError(f"config key {where}.uwo_lambda: a list of λ with objective {objs} "
                          "would repeat the non-UWO runs; sweep them in separate entries")


def method_runs(entries: Sequence[Mapping[str, Any]],
                trainer_keys: Mapping[str, set[str]], *, objective: str = "mean",
                uwo_lambda: float = 0.5, seeds: Sequence[int] | None = None,
                adaptive_kl: bool = False) -> dict[str, MethodRun]:
    """Validated runs by name, in the order of :func:`expand_entries`, with defaults filled.
    ``trainer_keys``: the keys of ``training.ppo`` and ``training.preference``
    (``{"ppo": ..., "preference": ...}``) that a run's ``overrides`` may set; ``objective`` and
    ``uwo_lambda``: ``cdf``'s, the default proxy objective of ppo runs; ``seeds``:
    ``training.seeds``, the default ``seeds`` of an entry; ``adaptive_kl``:
    ``training.ppo.adaptive_kl`` (refused for ``beta: 0``). Raises :class:`ConfigError` naming
    the ``methods[i]`` entry and key."""
    default_obj = (objective, float(uwo_lambda) if objective == "uwo" else None)
    for i, raw in enumerate(entries):
        if isinstance(raw, Mapping):
            _check_objective_lists(raw, f"methods[{i}]", objective)
    runs: dict[str, MethodRun] = {}
    sweeps: dict[str, int] = {}  # sweep name -> the entry that has it
    entry_sweep: dict[int, str] = {}
    for ex in expand_entries(entries, seeds):
        where = f"methods[{ex.index}]"
        _check_entry(ex.spec, where, trainer_keys, adaptive_kl)
        spec = {**DEFAULTS, **ex.spec}
        if spec["method"] == "ppo":
            spec.setdefault("objective", objective)
            if spec["objective"] == "uwo":
                spec["uwo_lambda"] = float(spec.get("uwo_lambda", uwo_lambda))
            else:
                spec["uwo_lambda"] = None
        name = run_name(spec, ex.swept, ex.seed, default_obj)
        if name in runs:
            raise ConfigError(f"config key {where}: run name {name!r} is used twice; give "
                              "one of the entries a distinct `name`")
        if name in ("sft", "reference"):
            raise ConfigError(f"config key {where}.name: {name!r} is reserved")
        if ex.index not in entry_sweep:
            stem = _sweep_stem(spec, ex.swept, default_obj)
            sweep = stem if stem not in sweeps else f"{stem}-e{ex.index}"
            sweeps[sweep] = ex.index
            entry_sweep[ex.index] = sweep
        spec.update(name=name, seed=ex.seed, sweep=entry_sweep[ex.index],
                    knob="+".join(ex.swept) or None,
                    overrides=dict(spec.get("overrides") or {}))
        runs[name] = MethodRun(**spec)
    return runs


def training_seed(root_seed: int, run: MethodRun) -> int:
    """The seed a run trains with: derived from the config seed and the run's name, with the
    run's own ``seed`` folded in when it has one (runs that differ only by it train
    differently; a run without one keeps the seed it always had)."""
    if run.seed is None:
        return derive_seed(root_seed, "train", run.name)
    return derive_seed(root_seed, "train", run.base_name, "seed", int(run.seed))


def proxy_objective(run: MethodRun, cdf: Any) -> tuple[str, float]:
    """(objective, λ) of the proxy a PPO-family run trains on: a ppo run's own, else ``cdf``'s
    (``cdf``: the :class:`~pipeline_lib.settings.sections.CDFSettings`)."""
    if run.objective is None:
        return cdf.objective, float(cdf.uwo_lambda)
    lam = run.uwo_lambda if run.uwo_lambda is not None else cdf.uwo_lambda
    return run.objective, float(lam)


def pair_sizes(runs: Iterable[MethodRun]) -> list[int]:
    """The n of every best/worst-of-n pairs table the runs need."""
    return sorted({int(r.n) for r in runs if r.uses_pairs})


def kl_coefficient(run: MethodRun) -> float:
    """β of the KL penalty: the run's beta for ppo (0 allowed: no penalty), 1/(n − 1) for vbon
    and bond."""
    if run.method == "ppo":
        return float(run.beta)
    if run.method in ("vbon", "bond"):
        return vbon_beta(int(run.n))
    raise ValueError(f"method {run.method!r} has no PPO KL coefficient")
