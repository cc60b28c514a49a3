"""DER++: logits stored with the rows, matching the model that stored them; both replay terms."""

import dataclasses
import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipelines.strategies.derpp import stored_logits_mse


def test_derpp_stored_logits_match_the_model_that_stored_them_and_drift_after_training(make_learner, make_plan,
                                                                                     tmp_path):
    from storage.replay import ReplayShard

    learner, stream = make_learner({"name": "derpp", "top_k": 8, "replay_rows": 4}, max_steps=5)
    plan = make_plan(learner, stream, 0)
    assert plan.logit_rows is not None and plan.logit_rows.num_rows == len(stream[0].sources("train"))
    learner.train_task(plan)
    logits = learner.stored_columns()
    assert learner.stored_columns() is None  # handed over once
    assert logits.num_rows == plan.logit_rows.num_rows
    shard = ReplayShard(1000, seed=0, directory=tmp_path / "shard")
    shard.insert(plan.logit_rows.append_column("logits", logits.column("logits")))
    shard.close()
    rows = ReplayShard(1000, seed=0, directory=tmp_path / "shard").sample(8, np.random.default_rng(0))
    dark = learner.batching.with_logits(rows)
    assert dark["logit_valid"].any(dim=1).all() and dark["logit_ids"].shape[-1] == 8

    def mse():
        learner.model.eval()
        with torch.no_grad():
            out = learner.model(input_ids=dark["input_ids"], attention_mask=dark["attention_mask"], labels=dark["labels"])
        learner.model.train()
        return stored_logits_mse(out.logits, dark["logit_ids"], dark["logit_values"], dark["logit_valid"]).item()

    assert mse() == pytest.approx(0.0, abs=1e-8)  # the same model: its logits come back exactly
    learner.train_task(make_plan(learner, stream, 1))
    assert mse() > 1e-3  # after another task they have moved: the term DER++ trains against


def test_derpp_loss_adds_both_replay_terms(make_learner, make_plan):
    learner, stream = make_learner({"name": "derpp", "top_k": 4, "replay_rows": 2})
    plan = make_plan(learner, stream, 1)
    assert [(p.name, p.logits) for p in plan.replay_parts] == [("replay_logits", True), ("replay_ce", False)]
    assert plan.replay_rows_per_batch == 4
    replayed = pa.table({"source": ["category: red dog"] * 4, "target": ["color"] * 4})
    seen: dict = {}
    stats = learner.train_task(dataclasses.replace(plan, num_steps=2), replay=lambda: replayed,
                               on_step=lambda s, n, loss, metrics: seen.update(metrics))
    assert math.isfinite(stats["mean_loss"])
    assert "derpp_replay_ce" in seen and seen["derpp_mse"] == 0  # no stored logits: nothing to match
