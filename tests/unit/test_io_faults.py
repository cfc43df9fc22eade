"""Faults at the table edges: a truncated or corrupt Parquet input fails with one line naming
the file, and a write that fails part-way (the disk full) leaves the previous table intact and
no partial file behind."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pipeline_lib.io.tables import (
    SchemaError,
    iter_table_parts,
    read_polars,
    read_table,
    write_table,
)


def _rewards(rows: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"prompt_id": [f"p{i % 7}" for i in range(rows)],
            "sample_idx": np.arange(rows, dtype=np.int32),
            "scorer": ["gold"] * rows, "kind": ["gold"] * rows,
            "reward": rng.normal(size=rows)}


@pytest.fixture
def table(tmp_path) -> Path:
    return write_table(_rewards(500), tmp_path / "rewards.parquet", "rewards")


@pytest.mark.parametrize("damage", ["truncated", "zeroed_footer", "not_parquet", "empty"])
def test_a_damaged_parquet_input_names_the_file_in_one_line(table, damage):
    data = table.read_bytes()
    table.write_bytes({"truncated": data[: len(data) // 2],
                       "zeroed_footer": data[:-12] + bytes(12),
                       "not_parquet": b"prompt_id,reward\np0,1.0\n",
                       "empty": b""}[damage])
    with pytest.raises(SchemaError) as err:
        read_table(table, "rewards")
    msg = str(err.value)
    assert msg.startswith(f"{table}: not a readable Parquet file") and "\n" not in msg
    with pytest.raises(SchemaError, match="not a readable Parquet file"):
        read_polars(table, "rewards")
    with pytest.raises(SchemaError, match=f"{table}: not a readable Parquet file"):
        list(iter_table_parts(table, "rewards"))  # the part-by-part reader too


def test_a_write_that_fails_part_way_keeps_the_previous_table(table):
    """A real failed write: the process may not grow a file past 64 KiB (RLIMIT_FSIZE, the
    way a full disk refuses a write), and the new table is larger than that."""
    before = read_polars(table, "rewards")
    script = textwrap.dedent(f"""
        import resource, signal, sys
        import numpy as np
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_io_faults import _rewards
        from pipeline_lib.io.tables import write_table
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # the write fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
        write_table(_rewards(200_000, seed=1), {str(table)!r}, "rewards")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode != 0
    assert "File too large" in run.stderr or "EFBIG" in run.stderr or "errno 27" in \
        run.stderr.lower(), run.stderr[-2000:]
    assert read_polars(table, "rewards").equals(before)  # the previous table, intact
    assert sorted(p.name for p in table.parent.iterdir()) == [table.name]  # no partial file
