"""Checks of ``training.launch``: which accelerate config file a value names, and whether it fits
the number of processes and the PPO batch sizes."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipeline_lib.settings.errors import ConfigError
from pipeline_lib.settings.methods import MethodRun
from pipeline_lib.settings.paths import ACCELERATE_DIR
from pipeline_lib.settings.sections import LaunchSettings, PPOSettings, as_dict

SHIPPED = ("single", "ddp", "zero2", "zero3")


def accelerate_config_file(value: str) -> Path:
    """The accelerate config a ``training.launch.accelerate_config`` value names."""
    if value in SHIPPED:
        return ACCELERATE_DIR / f"{value}.yaml"
    path = Path(value)
    if not path.is_file():
        raise ConfigError(
            f"config key training.launch.accelerate_config: {value!r} is neither one of "
            f"{', '.join(SHIPPED)} nor an accelerate config file")
    return path


def read_accelerate_config(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"accelerate config {path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict) or "distributed_type" not in data:
        raise ConfigError(f"accelerate config {path}: no distributed_type (not an accelerate "
                          "config file?)")
    return data


def check_launch(launch: LaunchSettings, ppo: PPOSettings, runs: Iterable[MethodRun]) -> None:
    """Semantic checks of ``training.launch`` against the PPO batch sizes of the runs (raises
    :class:`ConfigError` naming the key)."""
    n = int(launch.num_processes)
    name = launch.accelerate_config
    if name is None:
        if n != 1:
            raise ConfigError(
                f"config key training.launch.num_processes is {n} but "
                "training.launch.accelerate_config is null (one process); choose ddp, zero2 or "
                "zero3 to train with several processes")
        return
    data = read_accelerate_config(accelerate_config_file(name))
    kind = str(data["distributed_type"]).upper()
    if kind == "NO" and n != 1:
        raise ConfigError(
            f"config key training.launch.num_processes is {n} but accelerate config {name!r} "
            "runs one process")
    if kind == "DEEPSPEED":
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError(
                f"config key training.launch.accelerate_config is {name!r} (DeepSpeed) but "
                "deepspeed is not installed: bash setup.sh installs it (or pip install "
                "--no-build-isolation deepspeed)")
        if data.get("num_machines", 1) != 1:
            raise ConfigError(f"accelerate config {name!r}: only one machine (node) per job is "
                              "supported (num_machines: 1)")
    for run in runs:
        if not run.is_ppo:
            continue
        settings = {**as_dict(ppo), **run.overrides}
        for key in ("rollout_batch_size", "minibatch_size"):
            if int(settings[key]) % n:
                raise ConfigError(
                    f"config key training.ppo.{key} ({settings[key]}, run "
                    f"{run.method}) must be a multiple of training.launch.num_processes "
                    f"({n}): each process takes an equal share (run {run.name})")
