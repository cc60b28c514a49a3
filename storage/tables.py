"""Example tables: the (source, target) text pairs every task is made of, as Arrow.

One schema, ``EXAMPLE_SCHEMA``; readers for JSONL, CSV and Parquet that name the file and the row
of any bad record; Parquet files written to a temporary name and renamed, so a reader never sees
half a file.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from storage import files
from storage.errors import StorageError

EXAMPLE_SCHEMA = pa.schema([("source", pa.string()), ("target", pa.string())])


class ExampleFileError(StorageError, ValueError):
    """An example file is missing, unreadable, or has a bad row. The message names file and row."""


def _bad_rows(table: pa.Table, path: Path, columns: tuple[str, ...], first_row: int) -> None:
    for column in columns:
        values = table.column(column)
        if values.null_count:
            row = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
            where = f"line {row + first_row}" if first_row else f"row {row}"
            raise ExampleFileError(f"{path}: {where} has no value in column {column!r}")


def _check_columns(path: Path, names: list[str], source_column: str, target_column: str) -> None:
    """Refuse a file whose columns (``names``) lack the task's source or target column."""
    missing = [c for c in (source_column, target_column) if c not in names]
    if missing:
        raise ExampleFileError(f"{path}: column(s) {missing} not found; the file has {names}. "
                               "Set the task's source.source_column / source.target_column.")


def _select(table: pa.Table, path: Path, source_column: str, target_column: str, first_row: int) -> pa.Table:
    _check_columns(path, table.column_names, source_column, target_column)
    _bad_rows(table, path, (source_column, target_column), first_row)
    columns = {}
    for name, column in (("source", source_column), ("target", target_column)):
        values = table.column(column)
        if pa.types.is_nested(values.type):
            raise ExampleFileError(f"{path}: column {column!r} holds {values.type} values, expected text")
        try:
            columns[name] = values.cast(pa.string())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:  # e.g. bytes that are not UTF-8
            raise _NotTextError(f"{path}: column {column!r} cannot be read as text ({exc})") from None
    return pa.table(columns)


class _NotTextError(ExampleFileError):
    """A column's values cannot be cast to text (raised by ``_select``)."""


_TEXT_TYPES = (str, int, float, bool)


def _text(value: object, path: Path, line_no: int, column: str) -> str:
    if value is None:
        raise ExampleFileError(f"{path}:{line_no}: column {column!r} is null; every example needs a {column}")
    if not isinstance(value, _TEXT_TYPES):
        raise ExampleFileError(f"{path}:{line_no}: column {column!r} holds a JSON {type(value).__name__}, "
                               "expected text")
    return str(value)


def _decode(raw: bytes, path: Path, line_no: int) -> str:
    try:
        return raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
    except UnicodeDecodeError as exc:
        raise ExampleFileError(
            f"{path}:{line_no}: not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
            "re-encode the file as UTF-8") from None


def _records(path: Path, source_column: str, target_column: str,
             max_rows: int | None = None) -> tuple[list[str], list[str]]:
    sources, targets = [], []

    def add(record: object, line_no: int) -> None:
        if not isinstance(record, dict):
            raise ExampleFileError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
        for column in (source_column, target_column):
            if column not in record:
                raise ExampleFileError(f"{path}:{line_no}: missing column {column!r} (the row has {sorted(record)})")
        sources.append(_text(record[source_column], path, line_no, source_column))
        targets.append(_text(record[target_column], path, line_no, target_column))

    with path.open("rb") as handle:
        head = handle.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        handle.seek(0)
        if path.suffix.lower() == ".json" and head.startswith(b"["):  # one JSON array of objects
            text = _decode(handle.read(), path, 1)
            try:
                records = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ExampleFileError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
            for index, record in enumerate(records[:max_rows]):
                add(record, index + 1)
            return sources, targets
        for line_no, raw in enumerate(handle, start=1):
            if max_rows is not None and len(sources) >= max_rows:
                break  # line by line: the rest of the file is never read
            line = _decode(raw, path, line_no)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ExampleFileError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
            add(record, line_no)
    return sources, targets


def _read_jsonl(path: Path, source_column: str, target_column: str, max_rows: int | None = None) -> pa.Table:
    sources, targets = _records(path, source_column, target_column, max_rows)
    return pa.table({"source": sources, "target": targets}, schema=EXAMPLE_SCHEMA)


def _read_csv_slowly(path: Path, source_column: str, target_column: str, max_rows: int | None = None) -> pa.Table:
    """Python's csv reader: no limit on a field's size, and the line of any bad row (what
    pyarrow's fast reader cannot give)."""
    csv.field_size_limit(sys.maxsize)
    sources, targets = [], []
    with path.open("rb") as handle:
        lines = (_decode(raw, path, n) for n, raw in enumerate(handle, start=1))
        reader = csv.reader(lines)
        try:
            header = next(reader)
        except StopIteration:
            raise ExampleFileError(f"{path}: the file is empty; it needs a header line and examples") from None
        except csv.Error as exc:
            raise ExampleFileError(f"{path}:1: not a CSV header ({exc})") from None
        _check_columns(path, header, source_column, target_column)
        at = [header.index(source_column), header.index(target_column)]
        while max_rows is None or len(sources) < max_rows:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                raise ExampleFileError(f"{path}:{reader.line_num}: not valid CSV ({exc})") from None
            if not row:
                continue
            if len(row) <= max(at):
                raise ExampleFileError(f"{path}:{reader.line_num}: {len(row)} field(s), the header has {len(header)}")
            for column, i in zip((source_column, target_column), at):
                if row[i] == "":
                    raise ExampleFileError(f"{path}: line {reader.line_num} has no value in column {column!r}")
            sources.append(row[at[0]])
            targets.append(row[at[1]])
    return pa.table({"source": sources, "target": targets}, schema=EXAMPLE_SCHEMA)


def read_examples(path: str | os.PathLike, *, source_column: str = "source", target_column: str = "target",
                  max_rows: int | None = None) -> pa.Table:
    """Read (source, target) pairs from a ``.jsonl``/``.json``, ``.csv`` or ``.parquet`` file.

    Rows are numbered as a person would find them: JSONL by line, CSV by line (header = line 1),
    Parquet from 0. A ``.json`` file may also hold one array of objects.

    ``max_rows``: read the first rows only, and nothing after them — JSONL and CSV line by line,
    Parquet by row group; a ``.json`` array is parsed whole. Parquet reads only the two columns.

    Raises:
        ExampleFileError: missing or empty file, unknown suffix, text that is not UTF-8, a missing
            column, a row without a value or with a value that is not text — naming file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise ExampleFileError(f"example file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _read_jsonl(path, source_column, target_column, max_rows)
    if suffix == ".csv":
        if path.stat().st_size == 0:
            raise ExampleFileError(f"{path}: the file is empty; it needs a header line and examples")
        try:
            reader = pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=1 << 24),
                                    convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
            return _select(_first_rows(reader, max_rows, reader.schema), path, source_column, target_column,
                           first_row=2)
        except (pa.ArrowException, _NotTextError):
            # Bad bytes, a row longer than a block, a broken quote: read it again slowly, which names
            # the line (or succeeds where only the fast reader's limits were the problem).
            return _read_csv_slowly(path, source_column, target_column, max_rows)
    if suffix == ".parquet":
        try:
            parquet = pq.ParquetFile(path)
            _check_columns(path, parquet.schema_arrow.names, source_column, target_column)
            columns = list(dict.fromkeys((source_column, target_column)))
            table = _first_rows(parquet.iter_batches(columns=columns), max_rows,
                                pa.schema([parquet.schema_arrow.field(c) for c in columns]))
        except (pa.ArrowException, OSError) as exc:
            raise ExampleFileError(f"{path}: cannot be read as Parquet ({exc})") from None
        return _select(table, path, source_column, target_column, first_row=0)
    raise ExampleFileError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json, .csv or .parquet")


def _first_rows(batches: Iterator[pa.RecordBatch], max_rows: int | None, schema: pa.Schema) -> pa.Table:
    """The first ``max_rows`` rows of a stream of record batches (all when None), reading no further."""
    taken, rows = [], 0
    for batch in batches:
        taken.append(batch)
        rows += batch.num_rows
        if max_rows is not None and rows >= max_rows:
            break
    table = pa.Table.from_batches(taken, schema=schema) if taken else schema.empty_table()
    return table if max_rows is None else table.slice(0, max_rows)


def write_parquet_atomic(table: pa.Table, path: str | os.PathLike) -> Path:
    """Write ``table`` to ``path`` via a temporary file in the same directory and a rename."""
    path = Path(path)
    files.make_dirs(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        files.observe("write", tmp)
        pq.write_table(table, tmp)
        files.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _stratified(labels: list[str], count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` positions of ``labels`` (already in a random order), each label getting its share
    (largest remainders), the first of each label's positions first. Returned in input order."""
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    names = sorted(by_label)
    exact = np.array([count * len(by_label[n]) / len(labels) for n in names])
    share = np.floor(exact).astype(int)
    for j in np.argsort(-(exact - share), kind="stable")[: count - share.sum()]:
        share[j] += 1
    return np.sort(np.concatenate([np.asarray(by_label[n][:k], dtype=int) for n, k in zip(names, share)]))


def split_examples(table: pa.Table, *, eval_fraction: float, seed: int,
                   max_eval: int | None = None) -> tuple[pa.Table, pa.Table]:
    """Cut ``table`` into train and eval with ``seed``: ``eval_fraction`` of its distinct sources
    (at least one, leaving one) held out, then at most ``max_eval`` of those kept for eval.

    - De-duplicated: rows with the same source text all go to one side, so no eval text is also
      trained on; eval keeps one row per source (the data's first), train keeps every row
      (shuffled, so a cap on training rows takes a random subset).
    - Stratified by target when the targets are labels (at most 100 distinct, each seen twice on
      average): each label's share of the eval split is its share of the sources.
    The held-out rows beyond ``max_eval`` are not trained on either.
    """
    if table.num_rows < 2:
        raise ValueError(f"need at least 2 examples to split into train and eval, got {table.num_rows}")
    sources, targets = table.column("source").to_pylist(), table.column("target").to_pylist()
    first: dict[str, int] = {}
    for i, source in enumerate(sources):
        first.setdefault(source, i)
    groups = np.fromiter(first.values(), dtype=int, count=len(first))  # each distinct source's first row
    if len(groups) < 2:
        raise ValueError(f"need at least 2 distinct sources to split into train and eval, got {len(groups)}")
    rng = np.random.default_rng(seed)
    groups = groups[rng.permutation(len(groups))]
    labels = [targets[i] for i in groups]
    distinct = len(set(labels))
    is_labels = distinct <= 100 and distinct * 2 <= len(groups)
    num_held = min(max(1, round(len(groups) * eval_fraction)), len(groups) - 1)
    held = _stratified(labels, num_held, rng) if is_labels else np.arange(num_held)
    keep = held
    if max_eval is not None and max_eval < len(held):
        keep = held[_stratified([labels[i] for i in held], max_eval, rng)] if is_labels else held[:max_eval]
    held_sources = {sources[groups[i]] for i in held}
    train_rows = np.array([i for i, source in enumerate(sources) if source not in held_sources], dtype=np.int64)
    train_rows = train_rows[rng.permutation(len(train_rows))]  # a cap on training rows takes a random subset
    return table.take(pa.array(train_rows, pa.int64())), table.take(pa.array(groups[keep], pa.int64()))
