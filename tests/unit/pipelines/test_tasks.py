import pyarrow as pa
import pytest

from pipelines.config import validate_config
from pipelines.errors import DataError
from pipelines.tasks import BUILTIN_TASKS, load_builtin, load_stream


def test_stream_loads_in_order_with_caps_and_prefixes(toy_stream_config):
    toy_stream_config["stream"]["tasks"][0].update(max_train_examples=10, max_eval_examples=3, prefix="cat: ")
    stream = load_stream(validate_config(toy_stream_config))
    assert stream.names == ["category", "first_word"]
    first = stream[0]
    assert (first.train.num_rows, first.eval.num_rows) == (10, 3)
    assert all(s.startswith("cat: ") for s in first.sources("train"))
    assert stream[1].prefix == "first word: "  # default: the task name
    assert set(first.targets("train")) <= {"color", "animal", "sky"}


def test_split_depends_on_the_split_seed_not_on_the_run_seed_or_the_order(toy_stream_config):
    a = load_stream(validate_config(toy_stream_config))
    toy_stream_config["stream"]["tasks"].reverse()
    toy_stream_config["seed"] = 1  # another run seed: the same eval examples
    b = load_stream(validate_config(toy_stream_config))
    assert a[0].eval.equals(b[1].eval) and a[0].train.equals(b[1].train)
    toy_stream_config["stream"]["split_seed"] = 1
    c = load_stream(validate_config(toy_stream_config))
    assert not c[1].eval.equals(b[1].eval)


def test_a_task_of_one_repeated_text_cannot_be_split(toy_stream_config, tmp_path):
    (tmp_path / "same.jsonl").write_text('{"source": "a", "target": "b"}\n' * 5)
    toy_stream_config["stream"]["tasks"][1]["source"]["path"] = str(tmp_path / "same.jsonl")
    with pytest.raises(DataError, match="task 'first_word': need at least 2 distinct sources"):
        load_stream(validate_config(toy_stream_config))


def test_missing_data_file_names_task_and_path(toy_stream_config, tmp_path):
    toy_stream_config["stream"]["tasks"][1]["source"]["path"] = str(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match=r"task 'first_word': example file not found: .*missing\.jsonl"):
        load_stream(validate_config(toy_stream_config))


def test_row_without_target_names_file_and_line(toy_stream_config, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"source": "a", "target": "b"}\n{"source": "c", "label": "d"}\n')
    toy_stream_config["stream"]["tasks"][0]["source"]["path"] = str(path)
    with pytest.raises(DataError, match=r"task 'category': .*bad\.jsonl:2: missing column 'target'"):
        load_stream(validate_config(toy_stream_config))


def test_empty_task_is_an_error(toy_stream_config, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    toy_stream_config["stream"]["tasks"][0]["source"]["path"] = str(path)
    with pytest.raises(DataError, match=r"task 'category' has 0 example\(s\)"):
        load_stream(validate_config(toy_stream_config))


def test_hf_save_to_disk_source(toy_stream_config, tmp_path):
    import datasets

    ds = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"q": ["a", "b", "c"], "a": ["1", "2", "3"]})})
    ds.save_to_disk(str(tmp_path / "hf"))
    toy_stream_config["stream"]["tasks"][0]["source"] = {
        "kind": "hf", "path": str(tmp_path / "hf"), "split": "train", "source_column": "q", "target_column": "a"}
    stream = load_stream(validate_config(toy_stream_config))
    assert stream[0].train.num_rows + stream[0].eval.num_rows == 3

    toy_stream_config["stream"]["tasks"][0]["source"]["split"] = "test"
    with pytest.raises(DataError, match=r"no split 'test'; it has \['train'\]"):
        load_stream(validate_config(toy_stream_config))


def test_unknown_builtin_lists_the_choices(tmp_path):
    with pytest.raises(DataError, match=r"unknown built-in data set 'sms'; choose one of \["):
        load_builtin("sms", tmp_path)


@pytest.mark.parametrize(
    ("name", "labels"),
    [
        ("question_type", {"ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"}),
        ("sms_spam", {"ham", "spam"}),
        ("sentiment_movies", {"positive", "negative", "neutral"}),
        ("sentiment_tweets", {"positive", "negative", "neutral"}),
    ],
    ids=["question_type", "sms_spam", "sentiment_movies", "sentiment_tweets"],
)
def test_builtin_data_sets_are_fetched_and_cached(name, labels, tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "builtin-cache"  # shared: one download per session
    table = load_builtin(name, cache)
    assert table.num_rows > 1000
    assert set(table.column("target").to_pylist()) == labels
    assert (cache / "builtin" / f"{name}.parquet").is_file()
    assert load_builtin(name, cache).equals(table)  # second read from the Parquet cache


def test_pronunciation_builtin(tmp_path_factory):
    table = load_builtin("pronunciation", tmp_path_factory.getbasetemp() / "builtin-cache")
    rows = dict(zip(table.column("source").to_pylist(), table.column("target").to_pylist()))
    assert rows["adamson"] == "AE1 D AH0 M S AH0 N"
    assert len(rows) == table.num_rows  # one pronunciation per word
    assert isinstance(table, pa.Table)


def test_every_builtin_is_documented():
    assert all(spec.description for spec in BUILTIN_TASKS.values())


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "parquet"])
def test_a_capped_file_task_reads_only_the_rows_it_uses(suffix, toy_stream_config, tmp_path):
    import json

    import pyarrow.parquet as pq

    from pipelines.tasks import rows_to_read

    rows = [{"source": f"text number {i}", "target": "ab"[i % 2]} for i in range(5000)]
    path = tmp_path / f"big.{suffix}"
    if suffix == "jsonl":  # a broken line far past what the task uses: never read, so never an error
        path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    elif suffix == "csv":
        path.write_text("source,target\n" + "".join(f"{r['source']},{r['target']}\n" for r in rows) + '"broken,\n')
    else:  # many row groups, and a wide column the task does not name: neither is read
        table = pa.table({"source": [r["source"] for r in rows], "target": [r["target"] for r in rows],
                          "blob": [b"x" * 1000] * len(rows)})
        pq.write_table(table, path, row_group_size=500)
    toy_stream_config["stream"]["tasks"][0] = {"name": "big", "source": {"kind": "file", "path": str(path)},
                                               "max_train_examples": 100, "max_eval_examples": 20}
    config = validate_config(toy_stream_config)
    limit = rows_to_read(config.stream.tasks[0])
    assert limit == 148  # ceil(max(100 / 0.8, 20 / 0.2) x 1.1) + 10
    task = load_stream(config)[0]
    assert (task.train.num_rows, task.eval.num_rows) == (100, 20)
    read = {*task.sources("train"), *task.sources("eval")}
    assert all(int(s.rsplit(" ", 1)[1]) < limit for s in read)  # every row from the first `limit`

    toy_stream_config["stream"]["tasks"][0].pop("max_train_examples")  # uncapped: the whole file, its bad line too
    if suffix != "parquet":
        with pytest.raises(DataError, match=r"big\.(jsonl|csv)"):
            load_stream(validate_config(toy_stream_config))
