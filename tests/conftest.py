"""Shared fixtures: tiny local task files, a fresh MLflow store per test, quiet libraries."""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Every Ray the tests start (in this process, in a CLI subprocess, `ray start --head`) listens on all
# interfaces: token auth on, with a token of this test run's own (set before Ray is imported).
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray for the tests of a module that use one in this process (replay shards as actors),
    started as a run starts its own (``actors.cluster.start_local_ray``: loopback, a token of its
    own) and stopped after the module's last test. Not kept for the session: the modules that run
    between two that use it start Rays of their own (CLI runs, `ray start`), and an idle Ray costs
    ~1.8 s of CPU every 30 s. A module that needs a cluster of another shape shuts it down first
    (``ray.shutdown()``)."""
    import ray

    from actors.cluster import start_local_ray

    started = not ray.is_initialized()
    if started:
        start_local_ray(2, dashboard=False, log_to_driver=False)
    yield ray
    if started and ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="session", autouse=True)
def _stop_local_ray():
    yield
    import sys

    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()


def empty_mlflow_store() -> Path:
    """An SQLite file holding MLflow's schema and nothing else, made once per MLflow version under
    ~/.cache/forgetless/test-stores and copied for each test that needs a store.

    A new store runs every one of MLflow's schema migrations: about 3 s of CPU, paid by some forty
    tests and three `mlflow server` starts in one session. A copy is the same file those migrations
    would write. Stores made from nothing are still tested: tests marked ``new_mlflow_store`` get an
    empty path, which the run under test has to create.
    """
    from importlib.metadata import version

    template = Path(os.path.expanduser("~/.cache/forgetless/test-stores")) / f"mlflow-{version('mlflow')}.db"
    if not template.is_file():
        from mlflow.tracking import MlflowClient

        template.parent.mkdir(parents=True, exist_ok=True)
        part = template.with_name(f"{template.name}.{os.getpid()}.part")
        part.unlink(missing_ok=True)
        MlflowClient(f"sqlite:///{part}").search_experiments()  # runs the migrations
        os.replace(part, template)
    return template


# Tests of the layers that cannot reach MLflow (only actors imports it: lint-imports checks that)
# get no copy of the store; one would be 1 MB of disk for each of ~370 tests.
_WITHOUT_MLFLOW = (REPO / "tests" / "unit" / "storage", REPO / "tests" / "unit" / "pipelines")


@pytest.fixture(autouse=True)
def mlflow_store(request, tmp_path, monkeypatch) -> str:
    """Every test gets its own SQLite MLflow store (a copy of ``empty_mlflow_store``; no file at all
    under the ``new_mlflow_store`` marker or in the layers below actors); nothing leaks into
    ./mlflow.db."""
    path = tmp_path / "mlflow.db"
    if request.node.get_closest_marker("new_mlflow_store") is None and not any(
            layer in Path(request.node.path).parents for layer in _WITHOUT_MLFLOW):
        shutil.copyfile(empty_mlflow_store(), path)
    uri = f"sqlite:///{path}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_toy_task(path: Path, kind: str, n: int = 64, seed: int = 0) -> Path:
    """Small learnable tasks with disjoint labels: the first word's category, the first word, or the last."""
    rng = random.Random(seed)
    category = {"red": "color", "blue": "color", "green": "color", "cat": "animal", "dog": "animal",
                "fish": "animal", "sun": "sky", "moon": "sky", "star": "sky"}
    words = sorted(category)
    rows = []
    for _ in range(n):
        sentence = [rng.choice(words) for _ in range(rng.randint(2, 5))]
        target = {"category": category[sentence[0]], "first_word": sentence[0], "last_word": sentence[-1],
                  "count": ["two", "three", "four", "five"][len(sentence) - 2]}[kind]
        rows.append({"source": " ".join(sentence), "target": target})
    return write_jsonl(path, rows)


@pytest.fixture
def toy_stream_config(tmp_path, mlflow_store) -> dict:
    """A complete run config (as a dict) over two local toy tasks on a tiny T5."""
    first = make_toy_task(tmp_path / "data" / "category.jsonl", "category", seed=1)
    second = make_toy_task(tmp_path / "data" / "first.jsonl", "first_word", seed=2)
    return {
        "experiment": "toy",
        "seed": 0,
        "output_dir": str(tmp_path / "out"),
        "model": {"arch": "t5", "preset": "tiny", "tokenizer": {"vocab_size": 300}},
        "stream": {
            "cache_dir": str(tmp_path / "cache"),
            "max_source_tokens": 16,
            "max_target_tokens": 8,
            "tasks": [
                {"name": "category", "source": {"kind": "file", "path": str(first)}},
                {"name": "first_word", "source": {"kind": "file", "path": str(second)}},
            ],
        },
        "training": {"micro_batch_size": 8, "max_steps": 6, "lr": 3e-3, "zero_stage": 0, "log_every_n_steps": 2},
        "evaluation": {"batch_size": 16, "max_new_tokens": 8},
        "mlflow": {"tracking_uri": mlflow_store},
    }


@pytest.fixture
def toy_task():
    """The toy-task writer, for tests that need their own files."""
    return make_toy_task
