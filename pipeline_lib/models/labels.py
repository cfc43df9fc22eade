"""Which score a sequence classifier gives: the label it reads and the output (logit or
probability), checked against the model's labels. Pure functions over the model's config
values, shared by the scorers and the preflight check."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline_lib.settings.errors import ConfigError
from pipeline_lib.settings.sections import ScorerSettings

OUTPUTS = ("auto", "logit", "probability")


def config_section(key: str) -> str:
    """The config section of a scorer's model key (``gold.model`` -> ``gold``); a trained
    seed's settings come from ``reward_models``."""
    return key[: -len(".model")] if key.endswith(".model") else "reward_models"


def scorer_label(sc: ScorerSettings, num_labels: int, id2label: Mapping[Any, str]) -> int:
    """The index of the label a scorer reads, after checking it against the model's labels:
    ``label`` an index or a name of ``id2label`` (default: the only label, else the last), and
    ``output: probability`` refused on a one-label model (a softmax over one logit is 1.0 for
    every text). Raises :class:`ConfigError` naming the key."""
    sec = config_section(sc.key)
    names = {int(i): str(n) for i, n in id2label.items()} if id2label else {}
    listing = ", ".join(f"{i}: {names.get(i, f'LABEL_{i}')}" for i in range(num_labels))
    if sc.output == "probability" and num_labels == 1:
        raise ConfigError(f"config key {sec}.output: 'probability' of the one-label model "
                          f"{sc.model!r} is 1.0 for every text (a constant scorer); use 'logit' "
                          "or 'auto'")
    label = sc.label
    if label is None:
        return 0 if num_labels == 1 else num_labels - 1
    if isinstance(label, bool) or not isinstance(label, (int, str)):
        raise ConfigError(f"config key {sec}.label: {label!r} is neither an index nor a name")
    if isinstance(label, int):
        if not 0 <= label < num_labels:
            raise ConfigError(f"config key {sec}.label: index {label} is out of range; "
                              f"{sc.model!r} has labels {listing}")
        return label
    by_name = {n: i for i, n in names.items() if i < num_labels}
    if label not in by_name:
        raise ConfigError(f"config key {sec}.label: {label!r} is not a label of {sc.model!r}; "
                          f"its labels are {listing}")
    return by_name[label]


def read_output(output: str, num_labels: int, section: str) -> str:
    """``logit`` or ``probability`` for ``output`` (auto: a one-label model's logit, else the
    label's probability). A one-label model's probability is always 1.0: refused."""
    if output not in OUTPUTS:
        raise ConfigError(f"config key {section}.output: unknown output {output!r} "
                         f"({', '.join(OUTPUTS)})")
    if output == "auto":
        return "logit" if num_labels == 1 else "probability"
    if output == "probability" and num_labels == 1:
        raise ConfigError(f"config key {section}.output: probability of a one-label model is "
                         "always 1.0 (a constant scorer); use logit or auto")
    return output
