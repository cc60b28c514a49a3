"""One replay buffer a user might pick instead of ours, measured in its own environment.

bench/peers.py runs this file with each peer's Python (RLlib, Avalanche and Reverb need
dependencies ours must never have) and reads one JSON object from its last line of output. It
imports nothing of Forgetless and nothing outside the standard library except the peer itself.

  <peer python> bench/peer_runner.py PEER --rows FILE [--rounds 5]

One insert trial a process (so no trial inherits another's freed memory), then --rounds sampling
rounds on the buffer it filled; the result is one JSON line on stdout.

PEER is one of: rllib (ray.rllib's ReplayBuffer in this process), rllib_actor (the same buffer in
one Ray actor, two sample calls kept in flight), avalanche (avalanche-lib's ReservoirSamplingBuffer,
sampled through a torch DataLoader as its replay plugin does), reverb (a dm-reverb server in its
own process, written with a trajectory writer, read through a batched TrajectoryDataset).

FILE holds the rows as JSON lines, one 1k-row insert batch a line: {"example_id": [...],
"task_id": [...], "source": [...], "target": [...]}. Each batch is decoded into the peer's own
form before its insert is timed (a user's data arrives in that form); the decoded rows are then
owned by the buffer alone, so the holder's resident-memory growth is what holding them costs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

SAMPLE_ROWS = 256
ROUND_S, ROUND_MIN_BATCHES = 1.0, 20


def resident_bytes(pid: int) -> tuple[int, int]:
    """A process's resident memory from /proc (Linux): all of it (VmRSS), and its private part
    (RssAnon: without mapped files and shared memory, e.g. Ray's object store arena, whose pages
    count in the RSS of every process that touched them)."""
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon"):
                fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["RssAnon"]


def growth_per_row(before: list[tuple[int, int]], after: list[tuple[int, int]], rows: int) -> tuple[float, float]:
    """(resident, private) growth summed over processes, a row."""
    return (sum(a[0] - b[0] for a, b in zip(after, before)) / rows,
            sum(a[1] - b[1] for a, b in zip(after, before)) / rows)


class Peer:
    """A buffer of capacity ``capacity`` rows: decode, insert (acknowledged at ``flush``), sample."""

    holder_pid: int = os.getpid()

    def decode(self, batch: dict[str, list]) -> Any:
        return batch

    def insert(self, native: Any) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        """Return once every insert so far is held by the buffer."""

    def size(self) -> int:
        raise NotImplementedError

    def sampler(self) -> Callable[[], int]:
        """A callable that returns one sampled batch's row count."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class RLlibPeer(Peer):
    """ray.rllib's ReplayBuffer with its default storage unit (timesteps: one row an item)."""

    def __init__(self, capacity: int):
        from ray.rllib.utils.replay_buffers import ReplayBuffer

        self.buffer = ReplayBuffer(capacity=capacity, storage_unit="timesteps")

    def decode(self, batch: dict[str, list]) -> Any:
        import numpy as np
        from ray.rllib.policy.sample_batch import SampleBatch

        return SampleBatch({"example_id": np.array(batch["example_id"], dtype=object),
                            "task_id": np.array(batch["task_id"], dtype=np.int32),
                            "source": np.array(batch["source"], dtype=object),
                            "target": np.array(batch["target"], dtype=object)})

    def insert(self, native: Any) -> None:
        self.buffer.add(native)

    def size(self) -> int:
        return sum(item.count for item in self.buffer._storage)

    def sampler(self) -> Callable[[], int]:
        return lambda: self.buffer.sample(SAMPLE_ROWS).count


class RLlibActorPeer(RLlibPeer):
    """The same buffer in one Ray actor: inserts pipelined and acknowledged at flush, two sample
    calls in flight (the prefetch our sampler has too), each call one 256-row batch."""

    def __init__(self, capacity: int):
        import ray
        from ray.rllib.utils.replay_buffers import ReplayBuffer

        if not ray.is_initialized():  # a Ray of its own, as `forgetless run` starts: never one a `ray start` left
            ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)

        @ray.remote(num_cpus=0)
        class BufferActor(ReplayBuffer):
            def pid(self) -> int:
                return os.getpid()

            def size(self) -> int:
                return sum(item.count for item in self._storage)

        self.ray = ray
        self.actor = BufferActor.remote(capacity=capacity, storage_unit="timesteps")
        self.holder_pid = ray.get(self.actor.pid.remote())
        self.pending: list = []

    def insert(self, native: Any) -> None:
        self.pending.append(self.actor.add.remote(native))

    def flush(self) -> None:
        self.ray.get(self.pending)
        self.pending = []

    def size(self) -> int:
        return self.ray.get(self.actor.size.remote())

    def sampler(self) -> Callable[[], int]:
        in_flight = [self.actor.sample.remote(SAMPLE_ROWS) for _ in range(2)]

        def next_batch() -> int:
            batch = self.ray.get(in_flight.pop(0))
            in_flight.append(self.actor.sample.remote(SAMPLE_ROWS))
            return batch.count

        return next_batch

    def close(self) -> None:
        self.ray.kill(self.actor)


class AvalanchePeer(Peer):
    """avalanche-lib's ReservoirSamplingBuffer, updated with each batch as an AvalancheDataset."""

    def __init__(self, capacity: int):
        from avalanche.training.storage_policy import ReservoirSamplingBuffer

        self.buffer = ReservoirSamplingBuffer(max_size=capacity)

    def decode(self, batch: dict[str, list]) -> Any:
        from avalanche.benchmarks.utils import AvalancheDataset
        from torch.utils.data import Dataset

        class Rows(Dataset):
            def __init__(self, columns: dict[str, list]):
                self.columns = columns

            def __len__(self) -> int:
                return len(self.columns["source"])

            def __getitem__(self, i: int) -> tuple:
                return (self.columns["example_id"][i], self.columns["task_id"][i], self.columns["source"][i],
                        self.columns["target"][i])

        return AvalancheDataset([Rows(batch)])

    def insert(self, native: Any) -> None:
        self.buffer.update_from_dataset(native)

    def size(self) -> int:
        return len(self.buffer.buffer)

    def sampler(self) -> Callable[[], int]:
        from torch.utils.data import DataLoader, RandomSampler

        data = self.buffer.buffer
        loader = DataLoader(data, batch_size=SAMPLE_ROWS, num_workers=0,
                            sampler=RandomSampler(data, replacement=True, num_samples=1 << 30))
        batches = iter(loader)
        return lambda: len(next(batches)[0])


REVERB_SERVER = """
import sys, reverb, tensorflow as tf
signature = {"example_id": tf.TensorSpec([], tf.string), "task_id": tf.TensorSpec([], tf.int32),
             "source": tf.TensorSpec([], tf.string), "target": tf.TensorSpec([], tf.string)}
table = reverb.Table("replay", sampler=reverb.selectors.Uniform(), remover=reverb.selectors.Fifo(),
                     max_size=int(sys.argv[1]), rate_limiter=reverb.rate_limiters.MinSize(1), signature=signature)
server = reverb.Server([table], port=None)
print(server.port, flush=True)
sys.stdin.read()
"""


class ReverbPeer(Peer):
    """A dm-reverb server in its own process (uniform sampler, FIFO remover), one item a row."""

    def __init__(self, capacity: int):
        import reverb

        self.server = subprocess.Popen([sys.executable, "-c", REVERB_SERVER, str(capacity)], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True)
        self.address = f"localhost:{int(self.server.stdout.readline())}"
        self.holder_pid = self.server.pid
        self.client = reverb.Client(self.address)
        self.reverb = reverb

    def decode(self, batch: dict[str, list]) -> Any:
        import numpy as np

        return [{"example_id": e, "task_id": np.int32(t), "source": s, "target": g}
                for e, t, s, g in zip(batch["example_id"], batch["task_id"], batch["source"], batch["target"])]

    def insert(self, native: Any) -> None:
        with self.client.trajectory_writer(num_keep_alive_refs=1) as writer:
            for row in native:
                writer.append(row)
                writer.create_item("replay", priority=1.0, trajectory={k: writer.history[k][-1] for k in row})
            writer.flush()

    def size(self) -> int:
        return self.client.server_info()["replay"].current_size

    def sampler(self) -> Callable[[], int]:
        dataset = self.reverb.TrajectoryDataset.from_table_signature(
            server_address=self.address, table="replay", max_in_flight_samples_per_worker=2 * SAMPLE_ROWS)
        batches = iter(dataset.batch(SAMPLE_ROWS))
        return lambda: int(next(batches).data["source"].shape[0])

    def close(self) -> None:
        self.server.stdin.close()
        self.server.wait(timeout=30)


PEERS: dict[str, type[Peer]] = {"rllib": RLlibPeer, "rllib_actor": RLlibActorPeer, "avalanche": AvalanchePeer,
                                "reverb": ReverbPeer}


def insert_trial(peer_type: type[Peer], lines: list[bytes], capacity: int) -> tuple[Peer, float, tuple[float, float]]:
    """A fresh buffer filled batch by batch; returns it, its acknowledged rows/s and its holder's
    (resident, private) memory growth a row, all over the batches after the first."""
    peer = peer_type(capacity)
    peer.insert(peer.decode(json.loads(lines[0])))  # the first batch warms the buffer (lazy imports,
    peer.flush()                                    # first allocations): not timed, not counted
    warm_rows = peer.size()
    gc.collect()
    before = [resident_bytes(peer.holder_pid)]
    took = 0.0
    for line in lines[1:]:
        native = peer.decode(json.loads(line))
        start = time.perf_counter()
        peer.insert(native)
        took += time.perf_counter() - start
        del native
    start = time.perf_counter()
    peer.flush()
    took += time.perf_counter() - start
    held = peer.size()
    if held != capacity:
        raise RuntimeError(f"the buffer holds {held} rows after inserting {capacity}")
    gc.collect()
    return peer, (capacity - warm_rows) / took, growth_per_row(before, [resident_bytes(peer.holder_pid)],
                                                                capacity - warm_rows)


def timed_round(next_batch: Callable[[], int]) -> float:
    """Rows/s of one sampling round: 256-row batches for at least ROUND_S and ROUND_MIN_BATCHES
    batches. bench/peers.py times our store and the Arrow take with it too."""
    rows, start = 0, time.perf_counter()
    while True:
        count = next_batch()
        if count != SAMPLE_ROWS:
            raise RuntimeError(f"a sample returned {count} rows, not {SAMPLE_ROWS}")
        rows += count
        elapsed = time.perf_counter() - start
        if elapsed >= ROUND_S and rows >= ROUND_MIN_BATCHES * SAMPLE_ROWS:
            return rows / elapsed


def sample_rounds(peer: Peer, rounds: int) -> list[float]:
    """Rows/s of ``rounds`` sampling rounds from the peer."""
    next_batch = peer.sampler()
    next_batch()  # the first call sets up what later ones reuse
    return [timed_round(next_batch) for _ in range(rounds)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("peer", choices=sorted(PEERS))
    parser.add_argument("--rows", type=Path, required=True, help="the JSON-lines batches bench/peers.py wrote")
    parser.add_argument("--rounds", type=int, default=0, help="sampling rounds after the insert (0: none)")
    args = parser.parse_args()
    random.seed(0)
    lines = args.rows.read_bytes().splitlines()
    capacity = sum(len(json.loads(line)["source"]) for line in lines)
    peer, rate, (per_row, private) = insert_trial(PEERS[args.peer], lines, capacity)
    print(f"{args.peer}: {rate:,.0f} rows/s inserted, {per_row:,.0f} resident bytes a row", file=sys.stderr, flush=True)
    result = {"rows": capacity, "insert_rows_per_s": rate, "bytes_per_row": per_row, "private_bytes_per_row": private}
    if args.rounds:
        result["sample_rows_per_s"] = sample_rounds(peer, args.rounds)
    peer.close()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
