"""The replay store on several nodes: Ray's own multi-node test cluster (one raylet per node, all on
this machine). Shard files live in a directory every node sees, as a real cluster's shared
filesystem."""

import time

import numpy as np
import psutil
import pyarrow as pa
import pytest
import ray
from ray.cluster_utils import Cluster

from actors.replay import ReplayStore
from pipelines.config import ReplayConfig
from storage.replay import route


@pytest.fixture(scope="module")
def cluster():
    ray.shutdown()  # the tests' shared local Ray, if up: this module needs three nodes of its own
    # Node loss noticed within ~2 s, not Ray's default ~15 s.
    head = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False,
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 3,
                           "health_check_timeout_ms": 500, "enable_metrics_collection": False}})
    workers = [head.add_node(num_cpus=1) for _ in range(2)]
    head.wait_for_nodes()
    ray.init(address=head.address, log_to_driver=False)
    yield head, workers
    ray.shutdown()
    head.shutdown()


def rows(ids):
    n = len(ids)
    return pa.table({"example_id": list(ids), "task_id": pa.array([0] * n, pa.int32()), "task_name": ["a"] * n,
                     "source": [f"text {i}" for i in ids], "target": ["x"] * n})


def held(store):
    """Each shard's ids, through the store's own calls (which wait for, or revive, a lost shard)."""
    return [store._call(i, "rows").column("example_id").to_pylist() for i in range(store.num_shards)]


def test_spread_places_shards_on_different_nodes_and_a_lost_node_s_shards_come_back_with_every_row(cluster, tmp_path):
    head, workers = cluster
    store = ReplayStore.create(ReplayConfig(enabled=True, num_shards=3, capacity_rows=100_000, snapshot_every_rows=500),
                               directory=tmp_path, seed=0)
    nodes = [n["node_id"] for n in store.nodes()]
    assert len(set(nodes)) == 3, nodes  # SPREAD: one shard per node

    acknowledged = [f"t:{i}" for i in range(3000)]
    for start in range(0, 3000, 250):
        store.insert(rows(acknowledged[start:start + 250]))  # returns once every part is acknowledged
    victim = workers[0]
    lost = [i for i, n in enumerate(nodes) if n == victim.node_id]
    assert lost, "no shard on the node to remove"
    doomed_pids = [int(n["pid"]) for n in store.nodes() if n["node_id"] == victim.node_id]
    head.remove_node(victim, allow_graceful=False)
    started = time.monotonic()
    while any(psutil.pid_exists(pid) for pid in doomed_pids):  # a lost node's workers linger a moment
        assert time.monotonic() - started < 60, "the removed node's shard process did not die"
        time.sleep(0.2)

    shards = held(store)  # waits (with retries) while Ray restarts the lost shard on a live node
    flat = [i for s in shards for i in s]
    assert sorted(flat) == sorted(acknowledged)  # every acknowledged row, each once
    for index, ids in enumerate(shards):
        assert (route(ids, 3) == index).all()
    after = [n["node_id"] for n in store.nodes()]
    assert all(after[i] != victim.node_id for i in lost) and after[lost[0]] in {n["NodeID"] for n in ray.nodes()
                                                                                 if n["Alive"]}
    assert store.stats()[lost[0]].restored_rows == len(shards[lost[0]]) > 0  # from its files, not replayed
    print(f"shard {lost[0]} back on node {after[lost[0]][:8]} after {time.monotonic() - started:.1f} s")

    more = [f"u:{i}" for i in range(500)]  # the restarted shard takes writes again
    store.insert(rows(more))
    assert store.num_rows() == 3500
    sample = store.sample(3000, np.random.default_rng(0))
    assert set(route(sample.column("example_id").to_pylist(), 3).tolist()) == {0, 1, 2}
    store.shutdown()
