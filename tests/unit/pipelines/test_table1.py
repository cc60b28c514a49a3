"""Table 1's cells and columns from run reports (no training here; tests/integration runs the command)."""

import pytest

from pipelines.config import validate_config
from pipelines.errors import ConfigError
from pipelines.report import MlflowRef, RunReport, TaskStats
from pipelines.table1 import LECTURE, format_table, ordered_sizes, run_config, summarize


def _config(**extra):
    return validate_config({
        "stream": {"tasks": [{"name": "a", "source": {"kind": "builtin", "name": "sms_spam"}, "max_train_examples": 100},
                             {"name": "b", "source": {"kind": "builtin", "name": "question_type"}}]},
        "strategy": {"name": "lwf"}, **extra})


def _report(acc, *, params, bytes_, steps=10, status="FINISHED", seconds=5.0):
    stats = {t: TaskStats(steps=steps, mean_loss=1.0, seconds=2.0, eval_seconds=0.5, started_at=0, ended_at=1,
                          examples=160 if steps else 0, trainable_params=params, trainable_bytes=bytes_)
             for t in ("a", "b")}
    learning = (acc[0][0] + acc[1][1]) / 2
    return RunReport(tasks=["a", "b"], acc_matrix=acc, baseline=[0.0, 0.0], strategy="naive", strategy_config={},
                     experiment="t", seed=0, status=status, train=stats, output_dir="/x", seconds=seconds,
                     metrics={"avg_acc": sum(acc[-1]) / 2, "learning_acc": learning,
                              "forgetting": max(0.0, acc[0][0] - acc[1][0])},
                     mlflow=MlflowRef(tracking_uri="sqlite:///x", run_id="r"))


def test_a_cell_is_the_config_under_one_paradigm_with_its_rows_cut_and_no_strategy():
    cell = run_config(_config(), "prompt_tuning", 32, output_dir="/out/pt", parent_run_id="p")
    assert cell.paradigm.name == "prompt_tuning" and cell.strategy.name == "naive"
    assert [t.max_train_examples for t in cell.stream.tasks] == [32, 32]
    assert cell.output_dir == "/out/pt" and cell.mlflow.parent_run_id == "p"
    whole = run_config(_config(), "fine_tuning", None, output_dir="/out/ft", parent_run_id=None)
    assert [t.max_train_examples for t in whole.stream.tasks] == [100, None]  # "all" keeps the task's own cap
    bigger = run_config(_config(), "fine_tuning", 500, output_dir="/o", parent_run_id=None)
    assert [t.max_train_examples for t in bigger.stream.tasks] == [100, 500]


def test_sizes_go_smallest_first_and_all_last():
    assert ordered_sizes([None, 256, 32]) == [32, 256, None]


@pytest.mark.parametrize("sizes, message", [([32, 32], "lists a value twice"), ([0], "positive")])
def test_bad_sizes_are_refused(sizes, message):
    with pytest.raises(ConfigError, match=message):
        _config(table1={"train_sizes": sizes})


def test_a_column_carries_what_the_table_reports():
    reports = {"32": _report([[0.5, 0.0], [0.2, 0.6]], params=1000, bytes_=4000),
               "all": _report([[0.8, 0.0], [0.3, 0.9]], params=1000, bytes_=4000, seconds=9.0)}
    entry = summarize("fine_tuning", reports, first_task="a", eval_examples=96)
    assert entry["trainable_params"] == 1000 and entry["bytes_per_task"] == 4000
    assert entry["acc_by_train_size"] == {"32": pytest.approx(0.55), "all": pytest.approx(0.85)}
    assert entry["forgetting"] == pytest.approx(0.5)  # the largest run's
    assert entry["first_task"] == {"when_learned": 0.8, "after_stream": 0.3}
    assert entry["seconds"] == 14.0
    assert entry["train_examples_per_s"] == 80.0  # 320 examples in 4 s of training
    assert entry["eval_examples_per_s"] == pytest.approx(96 * 2 / 1.0)


def test_prompt_engineering_stores_its_examples_text_and_trains_nothing():
    reports = {"all": _report([[0.1, 0.0], [0.1, 0.2]], params=0, bytes_=0, steps=0)}
    entry = summarize("prompt_engineering", reports, first_task="a", eval_examples=10, stored_text_bytes=123.4)
    assert entry["trainable_params"] == 0 and entry["bytes_per_task"] == 123.4
    assert entry["train_examples_per_s"] is None


def test_the_markdown_puts_the_lectures_words_beside_the_figures():
    columns = {
        "feature_extraction": summarize("feature_extraction", {"all": _report([[0.5, 0], [0.5, 0.5]], params=10, bytes_=40)},
                                        first_task="a", eval_examples=4),
        "fine_tuning": summarize("fine_tuning", {"all": _report([[0.9, 0], [0.1, 0.9]], params=1000, bytes_=4000,
                                                                 status="FAILED")},
                                 first_task="a", eval_examples=4),
    }
    text = format_table({"tasks": ["a", "b"], "model": "t5", "seed": 0, "train_sizes": ["all"], "paradigms": columns})
    assert "| | Feature extraction | Fine-tuning |" in text
    assert f"| Number of parameters that need to be trained — lecture | {LECTURE['parameters']['feature_extraction']} |" in text
    assert "| measured | 10 (1% of the model) | 1,000 |" in text
    assert "Runs that did not finish: fine_tuning at all rows" in text
