"""Example tables: the (source, target) text pairs every task is made of, as Arrow.

One schema, ``EXAMPLE_SCHEMA``; readers for JSONL, CSV and Parquet that name the file and the row
of any bad record; Parquet files written to a temporary name and renamed, so a reader never sees
half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

EXAMPLE_SCHEMA = pa.schema([("source", pa.string()), ("target", pa.string())])


class StorageError(Exception):
    """Base of the storage package's errors."""


class ExampleFileError(StorageError, ValueError):
    """An example file is missing, unreadable, or has a bad row. The message names file and row."""


def _bad_rows(table: pa.Table, path: Path, columns: tuple[str, ...], first_row: int) -> None:
    for column in columns:
        values = table.column(column)
        if values.null_count:
            row = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
            where = f"line {row + first_row}" if first_row else f"row {row}"
            raise ExampleFileError(f"{path}: {where} has no value in column {column!r}")


def _select(table: pa.Table, path: Path, source_column: str, target_column: str, first_row: int) -> pa.Table:
    missing = [c for c in (source_column, target_column) if c not in table.column_names]
    if missing:
        raise ExampleFileError(
            f"{path}: column(s) {missing} not found; the file has {table.column_names}. "
            "Set the task's source.source_column / source.target_column."
        )
    _bad_rows(table, path, (source_column, target_column), first_row)
    return pa.table(
        {
            "source": table.column(source_column).cast(pa.string()),
            "target": table.column(target_column).cast(pa.string()),
        }
    )


def _read_jsonl(path: Path, source_column: str, target_column: str) -> pa.Table:
    sources, targets = [], []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ExampleFileError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise ExampleFileError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
            for column in (source_column, target_column):
                if record.get(column) is None:
                    raise ExampleFileError(
                        f"{path}:{line_no}: missing column {column!r} (the row has {sorted(record)})"
                    )
            sources.append(str(record[source_column]))
            targets.append(str(record[target_column]))
    return pa.table({"source": sources, "target": targets}, schema=EXAMPLE_SCHEMA)


def read_examples(path: str | os.PathLike, *, source_column: str = "source", target_column: str = "target") -> pa.Table:
    """Read (source, target) pairs from a ``.jsonl``, ``.csv`` or ``.parquet`` file.

    Rows are numbered as a person would find them: JSONL by line, CSV by line (header = line 1),
    Parquet from 0.

    Raises:
        ExampleFileError: missing file, unknown suffix, missing column, or a row without a value.
    """
    path = Path(path)
    if not path.is_file():
        raise ExampleFileError(f"example file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".json"):
            return _read_jsonl(path, source_column, target_column)
        if suffix == ".csv":
            table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
            return _select(table, path, source_column, target_column, first_row=2)
        if suffix == ".parquet":
            return _select(pq.read_table(path), path, source_column, target_column, first_row=0)
    except pa.ArrowInvalid as exc:
        raise ExampleFileError(f"{path}: cannot be parsed: {exc}") from None
    raise ExampleFileError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .csv or .parquet")


def write_parquet_atomic(table: pa.Table, path: str | os.PathLike) -> Path:
    """Write ``table`` to ``path`` via a temporary file in the same directory and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def split_examples(table: pa.Table, *, eval_fraction: float, seed: int) -> tuple[pa.Table, pa.Table]:
    """Shuffle with ``seed`` and cut off ``eval_fraction`` (at least one row) for evaluation."""
    if table.num_rows < 2:
        raise ValueError(f"need at least 2 examples to split into train and eval, got {table.num_rows}")
    order = np.random.default_rng(seed).permutation(table.num_rows)
    num_eval = min(max(1, round(table.num_rows * eval_fraction)), table.num_rows - 1)
    return table.take(order[num_eval:]), table.take(order[:num_eval])
