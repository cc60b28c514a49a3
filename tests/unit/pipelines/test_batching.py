"""The batcher on its own: no model, no engine — a byte-level tokenizer that needs no files."""

import dataclasses

import pyarrow as pa
import pytest
import torch
from transformers import ByT5Tokenizer

from pipelines.batching import Batcher
from pipelines.errors import DataError
from pipelines.evaluation import Evaluator
from pipelines.plan import TaskPlan
from pipelines.strategies.base import IGNORE_INDEX, ReplayPart

TOKENIZER = ByT5Tokenizer()  # bytes + 3: pad 0, eos 1


def _batcher(**kwargs):
    settings = dict(source_tokens=8, max_target_tokens=4, micro_batch_size=4, device=torch.device("cpu"))
    return Batcher(TOKENIZER, **{**settings, **kwargs})


def _plan(rows=6, **kwargs):
    sources = [f"t: {chr(97 + i)}" for i in range(rows)]
    return TaskPlan(index=1, name="t", examples=pa.table({"source": sources, "target": ["x"] * rows}), num_steps=1,
                    seed=0, prefix="t: ", **kwargs)


def test_encoding_cuts_sources_and_targets_and_collation_pads_with_pad_and_ignore():
    batcher = _batcher()
    inputs, labels = batcher.encode(["abcdefghijk", "ab"], ["wxyz!", "w"])
    assert [len(x) for x in inputs] == [8, 3] and [len(y) for y in labels] == [4, 2]  # eos counted
    batch = batcher.collate(inputs, labels)
    assert batch["input_ids"][1].tolist()[3:] == [TOKENIZER.pad_token_id] * 5
    assert batch["attention_mask"].sum(1).tolist() == [8, 3]
    assert batch["labels"][1].tolist() == [ord("w") + 3, 1, IGNORE_INDEX, IGNORE_INDEX]


def test_a_token_the_decoder_starts_with_is_dropped_from_targets():
    start = ord("w") + 3
    assert _batcher(drop_first=start).encode_targets(["wx", "xw"]) == [[ord("x") + 3, 1], [ord("x") + 3, start, 1]]


def test_one_replay_draw_per_micro_batch_split_into_the_plan_parts_in_order():
    draws = []

    def replay():
        rows = pa.table({"source": [f"r{len(draws)}-{k}" for k in range(5)], "target": ["y"] * 5})
        draws.append(rows)
        return rows

    parts = (ReplayPart("mix", 1, mix=True), ReplayPart("reference", 2), ReplayPart("other", 2))
    batches = _batcher().batches(_plan(replay_rows_per_batch=5, replay_parts=parts), replay)
    first = next(batches)
    assert len(draws) == 1
    assert first.inputs["input_ids"].shape[0] == 4  # 3 of the task's rows and the mixed one
    decoded = TOKENIZER.batch_decode(first.inputs["input_ids"], skip_special_tokens=True)
    assert decoded[-1] == "r0-0" and all(d.startswith("t: ") for d in decoded[:3])
    for name, expected in (("reference", ["r0-1", "r0-2"]), ("other", ["r0-3", "r0-4"])):
        assert TOKENIZER.batch_decode(first.extras[name]["input_ids"], skip_special_tokens=True) == expected
    plain = next(_batcher().batches(_plan(replay_rows_per_batch=5, replay_parts=parts), replay, extras=False))
    assert len(draws) == 1 and plain.extras == {} and plain.inputs["input_ids"].shape[0] == 4


def test_views_put_the_tasks_rows_under_each_old_prefix():
    plan = _plan(distill_prefixes=("o: ", "p: "))
    views = _batcher(source_tokens=16).views(plan.examples.column("source").to_pylist()[:2], plan)
    assert [TOKENIZER.batch_decode(v, skip_special_tokens=True) for v in views] == [["o: a", "o: b"], ["p: a", "p: b"]]


def test_each_rank_takes_every_world_size_th_row_and_a_rank_with_none_is_refused():
    plan = _plan(rows=3)
    seen = [TOKENIZER.batch_decode(next(_batcher(rank=r, world_size=2, micro_batch_size=2).batches(plan))
                                   .inputs["input_ids"], skip_special_tokens=True) for r in range(2)]
    assert not set(seen[0]) & set(seen[1]) and len(seen[0]) + len(seen[1]) == 3
    with pytest.raises(DataError, match="worker 3 has none to train on"):
        next(_batcher(rank=3, world_size=4).batches(plan))


def test_replayed_corpus_rows_without_an_objective_are_refused_by_name():
    plan = dataclasses.replace(_plan(), denoised_tasks=(0,))
    rows = pa.table({"source": ["some corpus text"], "target": [""], "task_id": pa.array([0], pa.int32())})
    with pytest.raises(DataError, match="task 'pretraining' replays corpus text"):
        _batcher().replayed(rows, plan, rng=None)


@pytest.mark.parametrize(("n", "ranks", "expected"), [(5, 2, [[0, 2, 4], [1, 3, 5]]), (4, 2, [[0, 2], [1, 3]]),
                                                    (2, 3, [[0], [1], [2]])], ids=["odd", "even", "more-ranks"])
def test_every_rank_scores_an_equal_share_padded_past_the_end(n, ranks, expected):
    shares = []
    for rank in range(ranks):
        evaluator = Evaluator(_batcher(rank=rank, world_size=ranks), model=None, body=None, engine=None, comm=None,
                              settings=None, lockstep=False)
        shares.append(evaluator.share(n, model=None))
    assert shares == expected  # indices >= n are padding: every rank runs as many batches
    alone = Evaluator(_batcher(rank=1, world_size=ranks), model=None, body=None, engine=None, comm=None,
                      settings=None, lockstep=False)
    assert alone.share(n, model=torch.nn.Linear(1, 1)) == list(range(n))  # a plain module on one rank: all


def test_rows_mixed_on_top_come_beside_a_full_micro_batch_of_the_task():
    def replay():
        return pa.table({"source": ["r-0", "r-1"], "target": ["y", "y"]})

    parts = (ReplayPart("mix", 2, mix=True, on_top=True),)
    first = next(_batcher().batches(_plan(replay_rows_per_batch=2, replay_parts=parts), replay))
    decoded = TOKENIZER.batch_decode(first.inputs["input_ids"], skip_special_tokens=True)
    assert len(decoded) == 6 and decoded[4:] == ["r-0", "r-1"]  # micro_batch_size 4 of the task, then the two
    assert all(d.startswith("t: ") for d in decoded[:4])
