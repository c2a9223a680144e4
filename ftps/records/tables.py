"""CSV and Parquet files read into columns by name, bounded before they are read.

A table is what a person exports from a spreadsheet or a data frame: a header row of column names
(CSV, UTF-8, comma-separated; Parquet, its schema), then one row per record. Both readers return
``{column name: list of values}`` (strings for CSV, typed values for Parquet) for
``ftps.records.tabular.Schema.rows_from_columns`` to check against a task's schema.

Bounds, checked before the rows are materialised so that a huge or hostile file costs little:
``MAX_TABLE_BYTES`` of file, ``MAX_ROWS`` rows, ``MAX_COLUMNS`` columns, and for Parquet the
uncompressed size its metadata declares (a file of highly compressed pages must not expand past
``MAX_EXPANDED_BYTES``). Errors are ``InvalidArgument`` naming the file and, where there is one, the
row or column.
"""

from __future__ import annotations

import csv
import io
from typing import Any

from ftps.common.errors import InvalidArgument, ResourceExhausted
from ftps.common.task_rules import MAX_RECORDS

MiB = 1024 * 1024
MAX_TABLE_BYTES = 64 * MiB
MAX_EXPANDED_BYTES = 512 * MiB
MAX_ROWS = MAX_RECORDS
MAX_COLUMNS = 4096 + 8  # the schema's features, the label, record_id and a few more
TABLE_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}

Columns = dict[str, list[Any]]


def table_format(name: str) -> str | None:
    """"csv" or "parquet" from a file name's suffix; None for anything else."""
    lower = name.lower()
    return next((fmt for suffix, fmt in TABLE_SUFFIXES.items() if lower.endswith(suffix)), None)


def read_table(data: bytes, fmt: str, *, what: str) -> Columns:
    """The columns of a CSV or Parquet file's bytes (``fmt`` from :func:`table_format`)."""
    if not data:
        raise InvalidArgument(f"{what} is empty: a table with a header row and one row per record is needed",
                              reason="RECORDS_EMPTY", field="records")
    if len(data) > MAX_TABLE_BYTES:
        raise ResourceExhausted(f"{what} is {len(data) / MiB:.1f} MiB; at most {MAX_TABLE_BYTES // MiB} MiB "
                                "per file: split it into several files", reason="TOO_MANY_RECORDS", field="records")
    if fmt == "csv":
        return _read_csv(data, what)
    if fmt == "parquet":
        return _read_parquet(data, what)
    raise ValueError(f"unknown table format {fmt!r}")


def _too_many_rows(what: str, rows: int) -> ResourceExhausted:
    return ResourceExhausted(f"{what} has {rows} rows or more; at most {MAX_ROWS} per file: split it",
                             reason="TOO_MANY_RECORDS", field="records")


def _read_csv(data: bytes, what: str) -> Columns:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"{what} is not UTF-8 text (byte {exc.start}): save the CSV as UTF-8",
                              reason="RECORDS_BAD_DTYPE", field="records") from None
    if "\0" in text:
        raise InvalidArgument(f"{what} holds NUL bytes: not a CSV file", reason="RECORDS_BAD_DTYPE", field="records")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if not header or not any(h.strip() for h in header):
            raise InvalidArgument(f"{what} has no header row (the column names)", reason="RECORDS_EMPTY",
                                  field="records")
        header = [h.strip() for h in header]
        _check_header(header, what)
        columns: Columns = {h: [] for h in header}
        cells = list(columns.values())
        for line, row in enumerate(reader, start=2):
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # blank lines, e.g. at the end
            if len(row) != len(header):
                raise InvalidArgument(f"{what} line {line}: {len(row)} cells, the header names {len(header)} "
                                      "columns", reason="RECORDS_BAD_SHAPE", field="records")
            if len(cells[0]) >= MAX_ROWS:
                raise _too_many_rows(what, MAX_ROWS + 1)
            for col, value in zip(cells, row):
                col.append(value)
    except csv.Error as exc:
        raise InvalidArgument(f"{what} line {reader.line_num}: not valid CSV ({exc})", reason="RECORDS_BAD_SHAPE",
                              field="records") from None
    return columns


def _check_header(header: list[str], what: str) -> None:
    if len(header) > MAX_COLUMNS:
        raise InvalidArgument(f"{what} has {len(header)} columns; at most {MAX_COLUMNS}", reason="RECORDS_BAD_SHAPE",
                              field="records")
    seen = set()
    for h in header:
        if not h:
            raise InvalidArgument(f"{what}: a column has no name in the header", reason="RECORDS_BAD_SHAPE",
                                  field="records")
        if h in seen:
            raise InvalidArgument(f"{what}: column {h[:80]!r} appears twice in the header",
                                  reason="RECORDS_BAD_SHAPE", field="records")
        seen.add(h)


def _read_parquet(data: bytes, what: str) -> Columns:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(pa.BufferReader(data))
        meta = f.metadata
        if meta.num_rows > MAX_ROWS:
            raise _too_many_rows(what, meta.num_rows)
        _check_header(list(f.schema_arrow.names), what)
        expanded = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        if expanded > MAX_EXPANDED_BYTES:
            raise ResourceExhausted(f"{what} declares {expanded / MiB:.0f} MiB of uncompressed data; at most "
                                    f"{MAX_EXPANDED_BYTES // MiB} MiB", reason="TOO_MANY_RECORDS", field="records")
        table = f.read()
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise InvalidArgument(f"{what} is not a readable Parquet file: {str(exc)[:300]}",
                              reason="RECORDS_BAD_DTYPE", field="records") from None
    if table.num_rows != meta.num_rows:  # the metadata lied about what was bounded
        raise InvalidArgument(f"{what}: its metadata says {meta.num_rows} rows, it holds {table.num_rows}",
                              reason="RECORDS_BAD_SHAPE", field="records")
    columns: Columns = {}
    for name, column in zip(table.column_names, table.columns):
        if pa.types.is_nested(column.type) or pa.types.is_binary(column.type):
            raise InvalidArgument(f"{what}: column {name[:80]!r} is {column.type}; numbers or text are needed",
                                  reason="RECORDS_BAD_DTYPE", field="records")
        columns[name] = column.to_pylist()
    return columns


def write_table(columns: dict[str, list[Any]], fmt: str) -> bytes:
    """A table's bytes (the inverse of :func:`read_table`): for exports and tests."""
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(list(columns))
        w.writerows(zip(*columns.values()))
        return buf.getvalue().encode("utf-8")
    import pyarrow as pa
    import pyarrow.parquet as pq

    # A column of mixed types (a number and a typo) is written as text, as a spreadsheet would.
    columns = {name: [None if v is None else str(v) for v in col]
               if len({type(v) for v in col if v is not None}) > 1 else col for name, col in columns.items()}
    out = io.BytesIO()
    pq.write_table(pa.table(columns), out)
    return out.getvalue()
