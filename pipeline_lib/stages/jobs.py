"""The training jobs a stage dispatches, by name, and the entry point of each process that
``accelerate launch`` starts: ``python -m pipeline_lib.stages.jobs JOB.json``."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from pipeline_lib.stages.reward_model import reward_model_job
from pipeline_lib.stages.sft import sft_job
from pipeline_lib.stages.train import train_job
from pipeline_lib.train.distributed import exit_launched_process

# The jobs :func:`pipeline_lib.stages.common.dispatch_training_job` may launch, by stage name.
TRAINING_JOBS = {"sft": sft_job, "reward_model": reward_model_job, "train": train_job}


def main(argv: list[str] | None = None) -> None:
    """Entry point of each launched process: ``python -m pipeline_lib.stages.jobs JOB.json``."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m pipeline_lib.stages.jobs JOB.json")
    job = json.loads(Path(argv[0]).read_text())
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    if job["stage"] not in TRAINING_JOBS:
        raise SystemExit(f"unknown stage {job['stage']!r}; one of {sorted(TRAINING_JOBS)}")
    TRAINING_JOBS[job["stage"]](job["config"], **job["kwargs"])
    exit_launched_process()


if __name__ == "__main__":
    main()
