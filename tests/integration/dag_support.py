"""Helpers of the integration tests: Snakemake as a subprocess, its job table, Parquet table
comparison, and the tiny config's full DAG (shared by test_dag.py and test_slurm.py through the
`tiny_dag` fixture of conftest.py)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "data" / "tiny.yaml"
TINY_DAG_TIMEOUT_S = 1800  # the whole tiny DAG: minutes on 2 cores


def snakemake_cmd(workdir: Path, *args: str,
                  configfile: Path | Sequence[Path] = TINY) -> list[str]:
    """`snakemake` for ROOT's Snakefile, run in ``workdir`` (as users run it; Snakemake finds
    the workflow profile next to the Snakefile); several config files merge in order."""
    files = [configfile] if isinstance(configfile, (str, Path)) else list(configfile)
    return [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"),
            "--directory", str(workdir), "--configfile", *map(str, files), *args]


def snakemake_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONHASHSEED": "0", **extra}


def job_counts(output: str) -> Counter:
    """The 'Job stats' table Snakemake prints (runs and dry runs): rule -> number of jobs."""
    if "Job stats:" not in output:
        return Counter()
    table = output.split("Job stats:", 1)[1].split("total", 1)[0]
    return Counter({m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.M)})


# wall-clock columns: training logs' elapsed_s, the summary's train_wall_s
WALL_CLOCK_COLUMNS = ("elapsed_s", "train_wall_s")


def table_equal(a_path: Path, b_path: Path) -> bool:
    """Two Parquet tables hold the same data (provenance metadata and the wall-clock columns
    aside)."""
    a = pq.read_table(a_path).replace_schema_metadata(None)
    b = pq.read_table(b_path).replace_schema_metadata(None)
    clock = [c for c in WALL_CLOCK_COLUMNS if c in a.column_names]
    if clock:  # wall-clock columns differ; nothing else may
        a, b = a.drop(clock), b.drop(clock)
    return a.equals(b)


class TinyDag:
    """The tiny config's full DAG in a temporary working directory, local, 2 cores: started at
    most once per session (in the background, so a caller can do other work meanwhile) and
    shared by every test that reads its results."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.results = workdir / "results" / "tiny"
        self.proc: subprocess.Popen | None = None
        self.output: str | None = None

    def start(self) -> None:
        if self.proc is None:
            self.proc = subprocess.Popen(
                snakemake_cmd(self.workdir, "--cores", "2"), cwd=self.workdir,
                env=snakemake_env(), text=True, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self) -> Path:
        """The results directory, once the run has finished (fails every caller if it failed)."""
        self.start()
        if self.output is None:
            try:
                self.output, _ = self.proc.communicate(timeout=TINY_DAG_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.stop()
                self.output = f"timed out after {TINY_DAG_TIMEOUT_S} s"
        if self.proc.returncode != 0:
            pytest.fail(f"the tiny DAG failed ({self.proc.returncode}):\n{self.output[-20000:]}")
        return self.results

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.communicate()
