import os

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from pipeline_lib.io.schemas import SCHEMAS, SchemaError, describe_schema
from pipeline_lib.io.tables import read_polars, read_provenance, read_table, write_table


def rewards_frame(values):
    n = len(values)
    return pl.DataFrame({
        "prompt_id": [f"p{i // 2}" for i in range(n)],
        "sample_idx": [i % 2 for i in range(n)],
        "scorer": ["gold"] * n,
        "kind": ["gold"] * n,
        "reward": values,
    })


def test_roundtrip_with_provenance(tmp_path):
    path = tmp_path / "rewards.parquet"
    write_table(rewards_frame([0.1, 0.2]), path, "rewards", {"config_hash": "abc", "seed": 3})
    back = read_polars(path, "rewards")
    assert back["reward"].to_list() == [0.1, 0.2]
    assert back.schema["sample_idx"] == pl.Int32  # cast to the declared type
    assert read_provenance(path) == {"config_hash": "abc", "seed": 3}


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_write_refuses_non_finite_and_leaves_nothing(tmp_path, bad):
    path = tmp_path / "rewards.parquet"
    with pytest.raises(SchemaError, match=r"column 'reward' has 1 non-finite value\(s\)"):
        write_table(rewards_frame([0.1, bad]), path, "rewards")
    assert os.listdir(tmp_path) == []  # no partial table, no temp file


def test_failed_write_keeps_previous_table(tmp_path):
    path = tmp_path / "rewards.parquet"
    write_table(rewards_frame([1.0, 2.0]), path, "rewards")
    with pytest.raises(SchemaError):
        write_table(rewards_frame([1.0, np.nan]), path, "rewards")
    assert read_polars(path, "rewards")["reward"].to_list() == [1.0, 2.0]


def test_missing_column_named(tmp_path):
    with pytest.raises(SchemaError, match=r"missing column\(s\) \['kind'\]"):
        write_table(rewards_frame([1.0]).drop("kind"), tmp_path / "x.parquet", "rewards")
    path = tmp_path / "foreign.parquet"
    pq.write_table(rewards_frame([1.0]).drop("scorer").to_arrow(), path)
    with pytest.raises(SchemaError, match=rf"{path}: missing column 'scorer'"):
        read_table(path, "rewards")


def test_read_rejects_wrong_type_and_nan(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(rewards_frame([1.0]).with_columns(pl.col("reward").cast(pl.String))
                   .to_arrow(), path)
    with pytest.raises(SchemaError, match="column 'reward' has type large_string, expected double"):
        read_table(path, "rewards")
    pq.write_table(rewards_frame([1.0, np.nan]).with_columns(pl.col("sample_idx")
                   .cast(pl.Int32)).to_arrow(), path)
    with pytest.raises(SchemaError, match="non-finite"):
        read_table(path, "rewards")


def test_nulls_rejected_in_non_nullable(tmp_path):
    frame = rewards_frame([1.0, 2.0]).with_columns(
        pl.when(pl.col("sample_idx") == 1).then(None).otherwise(pl.col("scorer")).alias("scorer"))
    with pytest.raises(SchemaError, match="column 'scorer' has 1 null"):
        write_table(frame, tmp_path / "x.parquet", "rewards")


def test_every_schema_documented():
    for name in SCHEMAS:
        text = describe_schema(name)
        assert text.startswith(f"{name}:")
        assert len(text.splitlines()) == len(SCHEMAS[name]) + 1
