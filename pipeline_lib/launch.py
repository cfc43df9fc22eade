"""Run a training job as several processes with ``accelerate launch``.

``training.launch`` in the config chooses how the training jobs (rules ``sft``,
``reward_model`` and ``train``) run:

* ``accelerate_config: null`` (default): in the job's own process, on one device;
* ``single`` | ``ddp`` | ``zero2`` | ``zero3``: the shipped ``config/accelerate/<name>.yaml``, or a
  path to your own accelerate config file, launched with ``num_processes`` processes (one per
  GPU; the three rules ask the scheduler for that many GPUs).

The job writes its arguments to a JSON file and runs, without a shell,

    python -m accelerate.commands.launch --config_file FILE --num_processes N ... \\
        -m pipeline_lib.launch JOB.json

Every process then calls the same job function (``pipeline_lib.stages.TRAINING_JOBS``) with
those arguments; the trainers split each batch over the ranks and the main process writes the
outputs. The job's log receives every process's output.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline_lib.config import REPO_ROOT, ConfigError

log = logging.getLogger("pipeline")

ACCELERATE_DIR = REPO_ROOT / "config" / "accelerate"
SHIPPED = ("single", "ddp", "zero2", "zero3")
STAGES = ("sft", "reward_model", "train")


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


def check_launch(config: Mapping[str, Any]) -> None:
    """Semantic checks of ``training.launch`` (raises :class:`ConfigError` naming the key)."""
    launch = config["training"]["launch"]
    n = int(launch["num_processes"])
    name = launch["accelerate_config"]
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
    ppo = config["training"]["ppo"]
    for run in config.get("methods", []):
        if run.get("method") not in ("ppo", "vbon", "bond"):
            continue
        settings = {**ppo, **(run.get("overrides") or {})}
        for key in ("rollout_batch_size", "minibatch_size"):
            if int(settings[key]) % n:
                raise ConfigError(
                    f"config key training.ppo.{key} ({settings[key]}, run "
                    f"{run.get('name') or run['method']}) must be a multiple of "
                    f"training.launch.num_processes ({n}): each process takes an equal share")


def free_port() -> int:
    """A TCP port free on this host now, for the launcher's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_command(config_file: Path, num_processes: int, port: int, threads_per_process: int,
                   job_file: Path) -> list[str]:
    """The ``accelerate launch`` argument list (run without a shell)."""
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(config_file),
        "--num_processes", str(int(num_processes)),
        "--num_machines", "1",
        "--main_process_port", str(int(port)),
        "--num_cpu_threads_per_process", str(max(1, int(threads_per_process))),
        "-m", "pipeline_lib.launch", str(job_file),
    ]


def run_launched(stage: str, config: Mapping[str, Any], kwargs: Mapping[str, Any],
                 threads: int | None, workdir: Path) -> None:
    """Run ``TRAINING_JOBS[stage](config, **kwargs)`` in ``num_processes`` processes.

    Raises :class:`RuntimeError` naming the exit status when the launch fails (its output is
    in the job's log, above).
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; one of {STAGES}")
    launch = config["training"]["launch"]
    n = int(launch["num_processes"])
    config_file = accelerate_config_file(launch["accelerate_config"])
    _check_devices(config, n)
    workdir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".launch-{stage}-", suffix=".json", dir=workdir)
    job = Path(name)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump({"stage": stage, "config": config,
                       "kwargs": {**kwargs, "threads": max(1, (threads or 1) // n)}}, fh,
                      default=str)
        cmd = launch_command(config_file, n, free_port(), max(1, (threads or 1) // n), job)
        log.info("launching %d process(es) with %s: %s", n, config_file, " ".join(cmd))
        sys.stdout.flush()
        sys.stderr.flush()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.run(cmd, stdout=_fileno_or_none(sys.stdout),
                              stderr=subprocess.STDOUT, env=env, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"accelerate launch of stage {stage!r} ({n} processes, "
                               f"{config_file.name}) exited with status {proc.returncode}; "
                               "the processes' output is above in this log")
    finally:
        job.unlink(missing_ok=True)


def _fileno_or_none(stream):
    try:
        stream.fileno()
        return stream
    except (AttributeError, OSError, ValueError):
        return None


def _check_devices(config: Mapping[str, Any], n: int) -> None:
    import torch

    if config["device"] != "cpu" and torch.cuda.is_available() and torch.cuda.device_count() < n:
        raise ConfigError(
            f"config key training.launch.num_processes is {n} but this job sees "
            f"{torch.cuda.device_count()} GPU(s); give the job {n} GPUs (the train rule's `gpu` "
            "resource) or lower num_processes")


def main(argv: list[str] | None = None) -> None:
    """Entry point of each launched process: ``python -m pipeline_lib.launch JOB.json``."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m pipeline_lib.launch JOB.json")
    job = json.loads(Path(argv[0]).read_text())
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    if job["stage"] not in STAGES:
        raise SystemExit(f"unknown stage {job['stage']!r}")
    from pipeline_lib import stages
    from pipeline_lib.distributed import exit_launched_process

    stages.TRAINING_JOBS[job["stage"]](job["config"], **job["kwargs"])
    exit_launched_process()


if __name__ == "__main__":
    main()
