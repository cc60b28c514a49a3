"""What the replay benchmarks share: the review-text corpus, its payload size, and a store handle
whose shards draw and send their rows (zero-copy sampling off). Imported after quiet_environment()."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pyarrow as pa

from actors.replay import ReplayStore
from pipelines.tasks import load_builtin


def review_corpus(num_rows: int) -> pa.Table:
    """Real review text, three reviews joined a row (~500 characters, ~100 tokens), unique ids."""
    text = load_builtin("sentiment_movies", Path("~/.cache/forgetless").expanduser()).column("source").to_pylist()
    rng = np.random.default_rng(0)
    sources = [" ".join(text[j] for j in rng.integers(0, len(text), 3)) for _ in range(num_rows)]
    return pa.table({
        "example_id": [f"movies:{i}" for i in range(num_rows)],
        "task_id": pa.array(np.zeros(num_rows, dtype=np.int32)),
        "task_name": ["movies"] * num_rows,
        "source": sources,
        "target": rng.choice(["positive", "negative", "neutral"], num_rows).tolist(),
    })


def payload_bytes(table: pa.Table) -> int:
    """The rows' own bytes: UTF-8 of every string, 4 for the task id, 8 for the store's sequence number."""
    strings = sum(sum(len(s.encode()) for s in table.column(c).to_pylist())
                  for c in ("example_id", "task_name", "source", "target"))
    return strings + table.num_rows * (4 + 8)


def shards_send(store: ReplayStore) -> ReplayStore:
    """The same store, sampled the way it is across nodes: every shard draws and sends its rows."""
    handle = copy.copy(store)
    handle.config = store.config.model_copy(update={"zero_copy_sampling": False})
    return handle
