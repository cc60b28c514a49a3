"""Every strategy's accuracy matrix and per-task mean losses, pinned on the tiny stream.

One process: the plain scheduler as the coordinator, one learner, the replay store's shards on a
local Ray (the tests' ``local_ray``), the replay feeds the trainer workers use. The same seed gives
the same batches, replay draws, teachers and Fisher, so a change that only moves code gives the same
numbers to the last bit. The pins are in ``strategy_pins.json``; a change that means to move them
(a new loss average, a new default: the per-example mean replaced the token mean) rewrites them with ``FORGETLESS_REPIN=1`` and says so in its
commit. The accuracy matrices must match exactly; the losses to 2e-3 relative: they come from the CPU's
kernels, and on an AMD EPYC sentiment_movies' losses came out up to 6e-4 away from the pins made on
another machine, every matrix equal.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from actors.scheduler import Scheduler
from actors.trainer_group import replay_feeds
from pipelines.config import load_config, resolve_paths
from pipelines.learner import Learner, silence_library_noise
from pipelines.loop import run_stream
from pipelines.tasks import load_stream

silence_library_noise()

REPO = Path(__file__).resolve().parents[3]
PINS = Path(__file__).with_name("strategy_pins.json")

# Each strategy at small settings, so the whole file runs in about a minute.
STRATEGIES = {
    "naive": {"name": "naive"},
    "joint": {"name": "joint"},
    "cumulative": {"name": "cumulative"},
    "replay": {"name": "replay", "replay_ratio": 0.25},
    "lwf": {"name": "lwf"},
    "ewc": {"name": "ewc", "lambda": 1000.0, "fisher_examples": 16},
    "agem": {"name": "agem", "reference_rows": 8},
    "derpp": {"name": "derpp", "replay_rows": 4, "top_k": 8},
}
# DER++ under one memory budget and one replayed-rows rate (what `compare` requires): the budget's
# deletions, and the rate split over its two replayed batches
BUDGET = ["replay.memory_rows=48", "replay.rows_per_batch=4"]
WITH_BUDGET = {"derpp (budget)": "derpp"}
TINY = [
    "training.max_steps=15", "evaluation.batch_size=24", "replay.rows_per_task=32", "replay.num_shards=1",
    *(f"stream.tasks.{i}.{key}" for i in range(3) for key in ("max_train_examples=64", "max_eval_examples=24")),
]


# The tiny stream's tokenizer, trained once and kept: the tokenizers library's Unigram trainer
# breaks ties in hash-map order, so two processes train two slightly different vocabularies from
# the same text (and every loss after the first task moves by ~1e-3).
TOKENIZER = Path(__file__).with_name("data") / "tiny-stream-tokenizer"


def run_in_one_process(config, tokenizer_dir=TOKENIZER):
    stream = load_stream(config)
    scheduler = Scheduler(config, stream)
    learner = Learner(config, tokenizer_dir)
    try:
        run_stream(learner, scheduler, replay=replay_feeds(scheduler))
    finally:
        learner.close()
    return scheduler.finish()


def measured(report) -> dict:
    return {"acc_matrix": report.acc_matrix, "baseline": report.baseline,
            "mean_loss": {name: stats.mean_loss for name, stats in report.train.items()}}


@pytest.mark.slow  # a minute for all eight: `make test` runs them, `make check` does not
@pytest.mark.parametrize("name", [*STRATEGIES, *WITH_BUDGET], ids=[*STRATEGIES, *WITH_BUDGET])
def test_a_strategy_gives_its_pinned_matrix_and_losses(name, local_ray, tmp_path, mlflow_store):
    strategy = ",".join(f"{k}: {v}" for k, v in STRATEGIES[WITH_BUDGET.get(name, name)].items())
    tiny = [o for o in TINY if not o.startswith("replay.rows_per_task")] + BUDGET if name in WITH_BUDGET else TINY
    config = resolve_paths(load_config(REPO / "configs/tiny/naive.yaml", [
        *tiny, f"strategy={{{strategy}}}", f"output_dir={tmp_path / 'out'}", f"mlflow.tracking_uri={mlflow_store}"]))
    report = run_in_one_process(config)
    assert report.status == "FINISHED" and report.complete, report.error
    if name in WITH_BUDGET:  # the store never held more than the budget; each task its balanced share
        assert report.replay.rows_after_task == {"question_type": 48, "sms_spam": 48, "sentiment_movies": 48}
        assert report.replay.rows_per_task == {"question_type": 16, "sms_spam": 16, "sentiment_movies": 16}
    got = measured(report)
    pins = json.loads(PINS.read_text()) if PINS.is_file() else {}
    if os.environ.get("FORGETLESS_REPIN") == "1":
        pins[name] = got
        PINS.write_text(json.dumps(pins, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"pinned {name} anew in {PINS.name}")
    assert name in pins, f"no pin for {name}: run with FORGETLESS_REPIN=1 once, on code known to be right"
    pinned = pins[name]
    assert got["acc_matrix"] == pinned["acc_matrix"]
    assert got["baseline"] == pinned["baseline"]
    assert got["mean_loss"].keys() == pinned["mean_loss"].keys()
    for task, loss in pinned["mean_loss"].items():
        assert got["mean_loss"][task] == (None if loss is None else pytest.approx(loss, rel=2e-3)), task
