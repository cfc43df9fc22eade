"""One declared pyarrow schema per table, atomic Parquet writes and validating reads.

Every Parquet artifact the pipeline writes is listed in :data:`SCHEMAS`. Writers go through
:func:`write_table`, which casts to the declared schema, refuses non-finite values in columns
declared finite, attaches provenance metadata and renames a temporary file into place, so an
interrupted job never leaves a table that looks complete. Readers go through :func:`read_table`,
which raises :class:`SchemaError` naming the file and the offending column or row.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline_lib.io.atomic import atomic_file
from pipeline_lib.io.schemas import FINITE_COLUMNS, PROVENANCE_KEY, SCHEMA_KEY, SCHEMAS, SchemaError


def _check_finite(table: pa.Table, name: str, path: str | os.PathLike) -> None:
    for col in FINITE_COLUMNS.get(name, ()):
        if col not in table.column_names:  # a part read with some columns only
            continue
        arr = table.column(col)
        values = arr.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
        bad = ~np.isfinite(values)
        if arr.null_count:  # a null (nullable column) is no value, not a non-finite one
            bad &= ~arr.is_null().to_numpy(zero_copy_only=False)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise SchemaError(
                f"{path}: column '{col}' has {int(bad.sum())} non-finite value(s) "
                f"(first at row {row}: {values[row]!r})"
            )


def _check_nulls(table: pa.Table, schema: pa.Schema, path: str | os.PathLike) -> None:
    for field in schema:
        if not field.nullable and table.column(field.name).null_count:
            col = table.column(field.name)
            row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
            raise SchemaError(
                f"{path}: column '{field.name}' has {col.null_count} null value(s) "
                f"(first at row {row}) but is declared non-nullable"
            )


def _kind(t: pa.DataType) -> str:
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    if pa.types.is_integer(t):
        return "integer"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return f"list<{_kind(t.value_type)}>"
    if pa.types.is_null(t):
        return "null"
    return str(t)


def _cast_columns(table: pa.Table, schema: pa.Schema, path: str | os.PathLike) -> pa.Table:
    """Cast each column to its declared type; only same-kind, value-preserving casts
    (large_string -> string, int64 -> int32 when values fit, float32 -> float64, an all-null
    column) are accepted."""
    columns = []
    for field in schema:
        col = table.column(field.name)
        kind, want = _kind(col.type), _kind(field.type)
        ok_kind = kind == want or kind == "null" or (kind == "integer" and want == "float")
        if not ok_kind:
            raise SchemaError(
                f"{path}: column '{field.name}' has type {col.type}, expected {field.type}"
            )
        try:
            columns.append(col.cast(field.type, safe=True))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise SchemaError(
                f"{path}: column '{field.name}' cannot be cast to {field.type}: {exc}"
            ) from exc
    table = pa.Table.from_arrays(columns, names=schema.names)
    _check_nulls(table, schema, path)
    return pa.Table.from_arrays(columns, schema=schema)


def conform(data: Any, name: str, path: str | os.PathLike = "<table>") -> pa.Table:
    """Cast ``data`` (pyarrow Table, polars DataFrame or dict of columns) to schema ``name``."""
    schema = SCHEMAS[name]
    if isinstance(data, pa.Table):
        table = data
    elif hasattr(data, "to_arrow"):
        table = data.to_arrow()
    elif isinstance(data, Mapping):
        missing = [f.name for f in schema if f.name not in data]
        if missing:
            raise SchemaError(f"{path}: missing column(s) {missing} for table '{name}'")
        table = pa.table({f.name: pa.array(data[f.name], type=f.type) for f in schema})
    else:
        raise TypeError(f"cannot write {type(data).__name__} as table '{name}'")
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise SchemaError(f"{path}: missing column(s) {missing} for table '{name}'")
    table = _cast_columns(table, schema, path)
    _check_finite(table, name, path)
    return table


def write_table(
    data: Any,
    path: str | os.PathLike,
    name: str,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Validate ``data`` against schema ``name`` and write it atomically to ``path``.

    The table is written to a temporary file in the same directory and renamed into place,
    so readers never see a partial file. ``provenance`` (config hash, seed, model paths, ...)
    is stored as JSON in the Parquet key-value metadata.
    """
    path = Path(path)
    table = conform(data, name, path)
    table = table.replace_schema_metadata(_metadata(table.schema, name, provenance))
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return path


def _metadata(schema: pa.Schema, name: str, provenance: Mapping[str, Any] | None) -> dict:
    meta = dict(schema.metadata or {})
    meta[SCHEMA_KEY] = name.encode()
    meta[PROVENANCE_KEY] = json.dumps(dict(provenance or {}), sort_keys=True, default=str).encode()
    return meta


class TableWriter:
    """Appends parts of one table as Parquet row groups (see :func:`table_writer`)."""

    def __init__(self, writer: pq.ParquetWriter, name: str, path: Path) -> None:
        self._writer, self._name, self._path = writer, name, path
        self.rows = 0

    def write(self, data: Any) -> None:
        """Validate ``data`` against the table's schema and append it as a row group."""
        part = conform(data, self._name, self._path)
        self._writer.write_table(part.replace_schema_metadata(self._writer.schema.metadata))
        self.rows += part.num_rows


@contextmanager
def table_writer(path: str | os.PathLike, name: str,
                 provenance: Mapping[str, Any] | None = None) -> Iterator[TableWriter]:
    """Write table ``name`` to ``path`` part by part, so memory holds one part at a time.

    Each ``write`` validates its part like :func:`write_table` and appends it as a row group of
    a temporary file, renamed into place when the block ends without an error (so a killed or
    failed job leaves no table; with no part written, an empty table)."""
    path = Path(path)
    schema = SCHEMAS[name].with_metadata(_metadata(SCHEMAS[name], name, provenance))
    with atomic_file(path) as tmp:
        writer = pq.ParquetWriter(tmp, schema, compression="zstd")
        try:
            yield TableWriter(writer, name, path)
        finally:
            writer.close()


def _open(path: Path, name: str, opener):
    """``opener(path)``, a missing or damaged file raised naming the file."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: table '{name}' does not exist")
    try:
        return opener(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise SchemaError(f"{path}: not a readable Parquet file: {exc}") from exc


def _check_columns(path: Path, name: str, found: list[str]) -> None:
    for field in SCHEMAS[name]:
        if field.name not in found:
            raise SchemaError(f"{path}: missing column '{field.name}' (expected schema "
                              f"'{name}', found columns {found})")


def read_table(path: str | os.PathLike, name: str) -> pa.Table:
    """Read ``path`` and validate it against schema ``name``.

    Raises :class:`SchemaError` naming the file and the missing / mistyped / non-finite column.
    """
    path = Path(path)
    table = _open(path, name, pq.read_table)
    _check_columns(path, name, table.column_names)
    table = _cast_columns(table, SCHEMAS[name], path)
    _check_finite(table, name, path)
    return table


def iter_table_parts(path: str | os.PathLike, name: str,
                     columns: Sequence[str] | None = None,
                     rows: int | None = None) -> Iterator[pa.Table]:
    """Read ``path`` part by part, each part validated like :func:`read_table` (one
    :class:`SchemaError` naming the file for a damaged file, a missing or mistyped column).

    Parts are the file's row groups, or runs of ``rows`` rows (the last shorter) whatever the
    row groups; ``columns`` reads only those columns of the schema."""
    path = Path(path)
    parquet = _open(path, name, pq.ParquetFile)
    _check_columns(path, name, parquet.schema_arrow.names)
    schema = SCHEMAS[name]
    if columns is not None:
        schema = pa.schema([schema.field(c) for c in columns])
    if rows is None:
        parts = (_open(path, name, lambda _, i=i: parquet.read_row_group(i, columns=columns))
                 for i in range(parquet.num_row_groups))
    else:
        batches = parquet.iter_batches(batch_size=int(rows), columns=columns)
        parts = (pa.Table.from_batches([b]) for b in _guarded(path, name, batches))
    for part in parts:
        part = _cast_columns(part, schema, path)
        _check_finite(part, name, path)
        yield part


def distinct_values(path: str | os.PathLike, name: str, column: str) -> set:
    """The distinct values of one column of table ``name``, read one row group at a time."""
    out: set = set()
    for part in iter_table_parts(path, name, [column]):
        out.update(pc.unique(part.column(column)).to_pylist())
    return out


def read_rows_where(path: str | os.PathLike, name: str, column: str,
                    values: Sequence[Any]) -> pa.Table:
    """The rows of table ``name`` whose ``column`` is one of ``values``, validated like
    :func:`read_table`. Row groups whose statistics exclude every value are not read, so a
    table written in that column's order is read only where the values are."""
    import pyarrow.dataset as ds

    path = Path(path)
    dataset = _open(path, name, lambda p: ds.dataset(p, format="parquet"))
    _check_columns(path, name, dataset.schema.names)
    table = _open(path, name, lambda _: dataset.to_table(
        filter=pc.field(column).isin(pa.array(list(values), type=SCHEMAS[name].field(column).type))))
    table = _cast_columns(table, SCHEMAS[name], path)
    _check_finite(table, name, path)
    return table


def _guarded(path: Path, name: str, items: Iterator) -> Iterator:
    """``items``, a damaged file's read errors raised naming the file."""
    while True:
        try:
            item = next(items)
        except StopIteration:
            return
        except (pa.ArrowInvalid, OSError) as exc:
            raise SchemaError(f"{path}: not a readable Parquet file: {exc}") from exc
        yield item


def read_provenance(path: str | os.PathLike) -> dict[str, Any]:
    """The provenance dict stored by :func:`write_table` (empty if absent)."""
    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(PROVENANCE_KEY)
    return json.loads(raw) if raw else {}


def read_polars(path: str | os.PathLike, name: str):
    """:func:`read_table` as a polars DataFrame."""
    import polars as pl

    return pl.from_arrow(read_table(path, name))
