"""The plan: plain data, decided once, checked before any worker starts."""

import dataclasses
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.config import validate_config
from pipelines.errors import DataError
from pipelines.plan import TaskPlan, build_plan, check_stream, fingerprint
from pipelines.tasks import load_stream

REPO = Path(__file__).resolve().parents[3]


def test_the_plan_module_needs_no_torch():
    code = "import sys, pipelines.plan, pipelines.report, pipelines.rundir; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_plan_is_plain_data_with_every_decision_in_it(toy_stream_config):
    toy_stream_config["strategy"] = {"name": "replay", "replay_ratio": 0.25}
    config = validate_config(toy_stream_config)
    stream = load_stream(config)
    first, second = build_plan(config, stream, 0), build_plan(config, stream, 1)
    assert {f.name for f in dataclasses.fields(TaskPlan)} == {
        "index", "name", "examples", "num_steps", "seed", "replay_rows_per_batch", "teacher_dir", "model_dir",
        "state_dir"}
    assert (first.num_steps, first.replay_rows_per_batch) == (6, 0)  # nothing to replay before task 1
    assert (second.num_steps, second.replay_rows_per_batch) == (6, 2)
    assert second.state_dir.endswith("state/task-01") and second.model_dir.endswith("checkpoints/task-01-first_word")
    assert pickle.loads(pickle.dumps(second)).examples.equals(second.examples)


def test_fewer_rows_than_workers_is_refused_before_training(toy_stream_config, tmp_path):
    (tmp_path / "tiny.jsonl").write_text('{"source": "a", "target": "b"}\n' * 3)  # 2 train rows, 1 eval
    toy_stream_config["stream"]["tasks"][1]["source"]["path"] = str(tmp_path / "tiny.jsonl")
    toy_stream_config["training"]["num_workers"] = 4
    config = validate_config(toy_stream_config)
    with pytest.raises(DataError, match=r"num_workers=4.*task 'first_word' trains on 2 row\(s\)"):
        check_stream(config, load_stream(config))


def test_a_fingerprint_changes_with_any_example(toy_stream_config, tmp_path):
    config = validate_config(toy_stream_config)
    stream = load_stream(config)
    path = Path(toy_stream_config["stream"]["tasks"][0]["source"]["path"])
    path.write_text(path.read_text().replace("color", "colour", 1))
    changed = load_stream(config)
    assert fingerprint(stream[0]) != fingerprint(changed[0]) and fingerprint(stream[1]) == fingerprint(changed[1])
