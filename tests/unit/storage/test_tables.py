import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.tables import ExampleFileError, read_examples, split_examples, write_parquet_atomic


def test_jsonl_with_custom_columns(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "hi there", "label": "greeting"}\n\n{"text": "bye", "label": 3}\n')
    table = read_examples(path, source_column="text", target_column="label")
    assert table.to_pydict() == {"source": ["hi there", "bye"], "target": ["greeting", "3"]}


def test_jsonl_missing_column_names_file_line_and_column(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"source": "a", "target": "b"}\n{"source": "c"}\n')
    with pytest.raises(ExampleFileError, match=r"t\.jsonl:2: missing column 'target'"):
        read_examples(path)


def test_jsonl_bad_json_names_the_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"source": "a", "target": "b"}\n{"source": \n')
    with pytest.raises(ExampleFileError, match=r"t\.jsonl:2: not valid JSON"):
        read_examples(path)


def test_csv_missing_value_names_the_line(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("q,a\nwhat,that\nwho,\n")
    with pytest.raises(ExampleFileError, match=r"t\.csv: line 3 has no value in column 'a'"):
        read_examples(path, source_column="q", target_column="a")


def test_csv_and_parquet_missing_column_lists_what_is_there(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"x": ["a"], "y": ["b"]}), path)
    with pytest.raises(ExampleFileError, match=r"\['source', 'target'\] not found; the file has \['x', 'y'\]"):
        read_examples(path)
    assert read_examples(path, source_column="x", target_column="y").num_rows == 1


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(ExampleFileError, match="example file not found"):
        read_examples(tmp_path / "nope.jsonl")
    (tmp_path / "t.txt").write_text("x")
    with pytest.raises(ExampleFileError, match="unsupported file type '.txt'"):
        read_examples(tmp_path / "t.txt")


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    table = pa.table({"source": ["a"], "target": ["b"]})
    path = write_parquet_atomic(table, tmp_path / "sub" / "x.parquet")
    assert pq.read_table(path).equals(table)
    assert [p.name for p in path.parent.iterdir()] == ["x.parquet"]


def test_split_is_deterministic_disjoint_and_complete():
    table = pa.table({"source": [str(i) for i in range(100)], "target": ["t"] * 100})
    train, evaluation = split_examples(table, eval_fraction=0.2, seed=7)
    again_train, _ = split_examples(table, eval_fraction=0.2, seed=7)
    other_train, _ = split_examples(table, eval_fraction=0.2, seed=8)
    assert (train.num_rows, evaluation.num_rows) == (80, 20)
    assert train.equals(again_train)
    assert not train.equals(other_train)
    assert set(train["source"].to_pylist()).isdisjoint(evaluation["source"].to_pylist())


def test_split_keeps_repeated_texts_on_one_side_and_eval_free_of_repeats():
    sources = [f"text {i % 40}" for i in range(100)]  # 40 texts, most of them 2-3 times
    table = pa.table({"source": sources, "target": [f"label {i % 40 % 3}" for i in range(100)]})
    for seed in range(5):
        train, evaluation = split_examples(table, eval_fraction=0.25, seed=seed)
        held = evaluation["source"].to_pylist()
        assert len(held) == len(set(held)) == 10  # a quarter of the 40 distinct texts, once each
        assert set(train["source"].to_pylist()).isdisjoint(held)
        assert train.num_rows == sum(1 for s in sources if s not in set(held))  # every other row trains


def test_split_is_stratified_by_label_and_caps_eval_stratified():
    rng = np.random.default_rng(0)
    labels = rng.choice(["a", "b", "c"], p=[0.6, 0.3, 0.1], size=1000)
    table = pa.table({"source": [f"s{i}" for i in range(1000)], "target": labels.tolist()})
    train, evaluation = split_examples(table, eval_fraction=0.2, seed=3, max_eval=50)
    counts = {k: evaluation["target"].to_pylist().count(k) for k in "abc"}
    want = {k: 50 * (labels == k).mean() for k in "abc"}
    assert all(abs(counts[k] - want[k]) <= 1 for k in "abc"), (counts, want)
    assert train.num_rows == 800  # the 150 held out beyond the cap are not trained on


def test_generation_targets_are_not_stratified_but_split_all_the_same():
    table = pa.table({"source": [f"w{i}" for i in range(50)], "target": [f"p{i}" for i in range(50)]})
    train, evaluation = split_examples(table, eval_fraction=0.2, seed=1)
    assert (train.num_rows, evaluation.num_rows) == (40, 10)


def test_split_keeps_one_row_each_side():
    table = pa.table({"source": ["a", "b"], "target": ["x", "y"]})
    train, evaluation = split_examples(table, eval_fraction=0.9, seed=0)
    assert (train.num_rows, evaluation.num_rows) == (1, 1)


# ---------------------------------------------------------------- files nobody should have to debug
GOOD = b'{"source": "a", "target": "b"}\n'
BAD_FILES = {
    # name: (file name, bytes, message the error must carry)
    "jsonl-latin1-byte": ("t.jsonl", GOOD + '{"source": "caf\xe9", "target": "b"}\n'.encode("latin-1"),
                          r"t\.jsonl:2: not UTF-8 \(byte 0xe9 at column 16\); re-encode the file as UTF-8"),
    "jsonl-null-source": ("t.jsonl", GOOD + b'{"source": null, "target": "b"}\n',
                          r"t\.jsonl:2: column 'source' is null"),
    "jsonl-list-target": ("t.jsonl", GOOD + b'{"source": "a", "target": ["x"]}\n',
                          r"t\.jsonl:2: column 'target' holds a JSON list, expected text"),
    "jsonl-raw-nul": ("t.jsonl", GOOD + b'{"source": "a\x00", "target": "b"}\n', r"t\.jsonl:2: not valid JSON"),
    "jsonl-not-object": ("t.jsonl", GOOD + b'["a", "b"]\n', r"t\.jsonl:2: expected a JSON object, got list"),
    "csv-latin1-byte": ("t.csv", b"source,target\nok,fine\ncaf\xe9,b\n", r"t\.csv:3: not UTF-8"),
    "csv-broken-quote": ("t.csv", b'source,target\nok,fine\n"open,b\n', r"t\.csv:\d+: "),
    "csv-short-row": ("t.csv", b"source,target\nok,fine\nalone\n", r"t\.csv:3: 1 field\(s\), the header has 2"),
    "csv-empty": ("t.csv", b"", r"t\.csv: the file is empty"),
    "parquet-empty": ("t.parquet", b"", r"t\.parquet: cannot be read as Parquet"),
    "parquet-garbage": ("t.parquet", b"PAR1" + b"\x00" * 64 + b"PAR1", r"t\.parquet: cannot be read as Parquet"),
}


@pytest.mark.parametrize(("name", "data", "message"), list(BAD_FILES.values()), ids=list(BAD_FILES))
def test_a_bad_file_is_an_error_naming_file_and_line(tmp_path, name, data, message):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ExampleFileError, match=message):
        read_examples(path)


def test_parquet_with_nested_or_binary_columns_is_refused_by_column(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"source": [["a"]], "target": ["b"]}), path)
    with pytest.raises(ExampleFileError, match=r"column 'source' holds list<.*> values, expected text"):
        read_examples(path)
    pq.write_table(pa.table({"source": pa.array([b"\xff"], pa.binary()), "target": ["b"]}), path)
    with pytest.raises(ExampleFileError, match=r"column 'source' cannot be read as text"):
        read_examples(path)


GOOD_FILES = {
    "jsonl-bom": ("t.jsonl", b"\xef\xbb\xbf" + GOOD + GOOD),
    "json-array": ("t.json", b'[{"source": "a", "target": "b"}, {"source": "a", "target": "b"}]'),
    "jsonl-crlf": ("t.jsonl", GOOD.replace(b"\n", b"\r\n") * 2),
    "jsonl-huge-line": ("t.jsonl", GOOD + b'{"source": "' + b"x" * 5_000_000 + b'", "target": "b"}\n'),
    "csv-huge-field": ("t.csv", b"source,target\na,b\n" + b"x" * 20_000_000 + b",b\n"),
}


@pytest.mark.parametrize(("name", "data"), list(GOOD_FILES.values()), ids=list(GOOD_FILES))
def test_unusual_but_valid_files_are_read(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    table = read_examples(path)
    assert table.num_rows == 2 and table.column("target").to_pylist() == ["b", "b"]
