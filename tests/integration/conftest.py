"""Fixtures the integration tests share (helpers: dag_support.py)."""

from __future__ import annotations

import pytest
from dag_support import TinyDag


@pytest.fixture(scope="session")
def tiny_dag(tmp_path_factory):
    """The tiny config's full DAG, run once per session (local, 2 cores) and read by
    test_dag.py and, beside the SLURM run it is compared with, by test_slurm.py."""
    dag = TinyDag(tmp_path_factory.mktemp("dag"))
    yield dag
    dag.stop()
