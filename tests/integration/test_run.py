"""End to end through `forgetless run`: local Ray, Ray Train workers, DeepSpeed, MLflow. (The tiny
config's stream end to end against an `mlflow server`: tests/integration/test_compare.py.)"""

import json
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, T5ForConditionalGeneration

from pipelines.config import ModelConfig, load_config
from pipelines.models import hf_config, save_pretrained, train_tokenizer
from pipelines.memory import GIB
from pipelines.tasks import load_stream

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.new_mlflow_store
def test_two_workers_zero3_with_a_replay_store(cli_watching_listeners, toy_config_file, tmp_path, mlflow_store):
    """...from a model a user brings as a ``save_pretrained`` directory (weights and tokenizer); and
    the run's Ray listens on loopback only, every port of it refusing a caller without the run's
    token; the run makes its MLflow store, which nothing made in advance."""
    path = toy_config_file(num_workers=2, zero_stage=3, max_steps=8)
    texts = load_stream(load_config(path)).training_text(first_only=False)
    tokenizer = train_tokenizer(texts, arch="t5", vocab_size=300)
    shape = hf_config(ModelConfig(arch="t5", preset="tiny"), tokenizer)
    shape.num_layers = shape.num_decoder_layers = 1  # a shape no preset has: the run must take the directory's
    brought = save_pretrained(T5ForConditionalGeneration(shape), tokenizer, tmp_path / "brought")
    result, listeners = cli_watching_listeners("run", str(path), "replay.enabled=true", "replay.num_shards=2",
                                                   "replay.rows_per_task=20", "model.preset=null",
                                                   f"model.name_or_path={brought}", "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    names = {name for name, _ in listeners.seen.values()}
    assert {"gcs_server", "raylet"} <= names and len(listeners.seen) >= 8, listeners.seen  # the watch saw the run
    # Ray Train's actors listen too; its preemption watcher does not run on a Ray of one machine
    assert "ray::RayTrainWorker" in names and not any(name.startswith("ray::Preemption") for name in names), names
    assert listeners.exposed() == [], listeners.exposed()  # nothing answers a stranger without the token...
    beyond_loopback = {f"{name} on {ip}:{port}" for (ip, port), (name, verdict) in listeners.seen.items()
                       if verdict != "loopback"}
    assert beyond_loopback == set()  # ...and nothing listens beyond loopback at all
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    replay = report["replay"]
    assert replay["rows_per_task"] == {"category": 20, "first_word": 20}
    assert replay["num_shards"] == 2 and sum(replay["rows_per_shard"]) == 40
    assert sorted(p.name for p in (tmp_path / "out" / "replay").iterdir()) == ["shard-000", "shard-001", "store.json"]
    assert np.array(report["acc_matrix"], dtype=float).shape == (2, 2)
    assert report["status"] == "FINISHED"
    assert MlflowClient(mlflow_store).get_run(report["mlflow"]["run_id"]).info.status == "FINISHED"
    assert report["init"] == {"kind": "pretrained", "source": f"name_or_path {brought}", "checkpoint": str(brought),
                              "pretrain": None}
    model = AutoModelForSeq2SeqLM.from_pretrained(report["checkpoints"]["first_word"])
    assert model.config.model_type == "t5" and model.config.num_layers == 1  # the brought model's shape, trained
    saved = AutoTokenizer.from_pretrained(report["checkpoints"]["first_word"])
    assert saved.get_vocab() == tokenizer.get_vocab()  # its own tokenizer, not one trained for the run


def test_the_probe_tells_an_open_server_from_a_guarded_one(listener_probe):
    """The listener check can fail: a server that answers without credentials reads as open."""
    import http.server
    import threading

    class Guarded(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(401 if "guarded" in self.server.kind else 200)
            self.end_headers()

        def log_message(self, *args):
            pass

    verdicts = {}
    for kind in ("open", "guarded"):
        server = http.server.HTTPServer(("127.0.0.1", 0), Guarded)
        server.kind = kind
        threading.Thread(target=server.serve_forever, daemon=True).start()
        verdicts[kind] = listener_probe("127.0.0.1", server.server_address[1], [])
        server.shutdown()
        server.server_close()
    assert verdicts == {"open": "open (HTTP 200)", "guarded": "refused"}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stream.tasks.1.source.path=/nonexistent/data.jsonl", "task 'first_word': example file not found"),
        ("strategy.name=replya", "unknown strategy 'replya'"),
        ("model.arch=gpt2", "model.arch: Input should be 't5', 'bart' or 'encoder_decoder'"),
        ("training.precision=fp16", "fp16 is refused for T5"),
        ("model.preset=null", "set model.preset"),
    ],
    ids=["missing-file", "unknown-strategy", "unknown-arch", "fp16-t5", "no-model"],
)
def test_bad_input_fails_before_training(cli, toy_config_file, mlflow_store, override, message):
    result = cli("run", str(toy_config_file()), override, "--no-progress", timeout=60)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert MlflowClient(mlflow_store).get_experiment_by_name("forgetless") is None  # nothing started


def test_a_model_this_machine_cannot_train_is_refused_before_ray_starts(cli, toy_config_file, mlflow_store):
    total = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                 if line.startswith("MemTotal:"))
    if total > 40 * GIB:
        pytest.skip(f"this machine has {total / GIB:.0f} GiB: t5-large on two workers at stage 0 (~25 GiB) fits")
    result = cli("run", str(toy_config_file()), "model.preset=t5-large", "training.num_workers=2",
                 "training.zero_stage=0", "--no-progress", timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "a 738M-parameter model under training.zero_stage=0, training.num_workers=2" in result.stderr
    assert "GiB of host memory for its 2 worker(s)" in result.stderr and "model states 11.0 GiB" in result.stderr
    assert "this would fit: training.zero_stage=" in result.stderr or "no stage, offload" in result.stderr
    assert "Traceback" not in result.stderr
    assert MlflowClient(mlflow_store).get_experiment_by_name("forgetless") is None  # nothing started
