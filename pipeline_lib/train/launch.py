"""Run a training job as several processes with ``accelerate launch`` (``training.launch``)."""

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

from pipeline_lib.settings.errors import ConfigError
from pipeline_lib.settings.launch import accelerate_config_file
from pipeline_lib.settings.sections import LaunchSettings

log = logging.getLogger("pipeline")


def free_port() -> int:
    """A TCP port free on this host now, for the launcher's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_command(config_file: Path, num_processes: int, port: int, threads_per_process: int,
                   job_file: Path, entry_module: str) -> list[str]:
    """The ``accelerate launch`` argument list (run without a shell): every process runs
    ``python -m entry_module job_file``."""
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(config_file),
        "--num_processes", str(int(num_processes)),
        "--num_machines", "1",
        "--main_process_port", str(int(port)),
        "--num_cpu_threads_per_process", str(max(1, int(threads_per_process))),
        "-m", entry_module, str(job_file),
    ]


def run_launched(stage: str, entry_module: str, config: Mapping[str, Any],
                 launch: LaunchSettings, device: str, kwargs: Mapping[str, Any],
                 threads: int | None, workdir: Path) -> None:
    """Run the training job ``stage`` in ``launch.num_processes`` processes: each runs
    ``python -m entry_module JOB.json``, where the JSON file holds ``stage``, the validated
    ``config`` and ``kwargs``.

    Raises :class:`RuntimeError` naming the exit status when the launch fails (its output is
    in the job's log, above).
    """
    n = int(launch.num_processes)
    config_file = accelerate_config_file(launch.accelerate_config)
    _check_devices(device, n)
    workdir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".launch-{stage}-", suffix=".json", dir=workdir)
    job = Path(name)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump({"stage": stage, "config": config,
                       "kwargs": {**kwargs, "threads": max(1, (threads or 1) // n)}}, fh,
                      default=str)
        cmd = launch_command(config_file, n, free_port(), max(1, (threads or 1) // n), job,
                             entry_module)
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


def _check_devices(device: str, n: int) -> None:
    import torch

    if device != "cpu" and torch.cuda.is_available() and torch.cuda.device_count() < n:
        raise ConfigError(
            f"config key training.launch.num_processes is {n} but this job sees "
            f"{torch.cuda.device_count()} GPU(s); give the job {n} GPUs (the train rule's `gpu` "
            "resource) or lower num_processes")
