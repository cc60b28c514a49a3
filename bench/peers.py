"""Our replay store beside the buffers a user would pick instead, on the same rows, in one run.

The same real review-text rows (100k by default), inserted in 1k-row batches and sampled in
256-row batches, through:

  forgetless    the replay store: 4 shard actors on a local Ray, in memory (no log, as the peers
                hold theirs), sampled by the PrefetchingSampler a trainer gets; beside it the
                same store writing its durable log (insert_rows_per_s_durable)
  rllib         ray.rllib's ReplayBuffer in this process (storage unit: timesteps, one row an item)
  rllib_actor   the same buffer in one Ray actor, as an RLlib user would share it
  avalanche     avalanche-lib's ReservoirSamplingBuffer, sampled through a torch DataLoader
  reverb        a dm-reverb server in its own process, read through a batched TrajectoryDataset
  arrow_take    pyarrow's take on one in-process table: the limit no store can pass

Each peer runs in its own virtual environment under --envs (built on first use with pip from the
package index as published, this machine's pip configuration ignored: a locally pinned torch
would not match the index's torchvision), never in ours: they are not dependencies of Forgetless.
A peer that does not install or import is reported with its error, not dropped.

For each: insert_rows_per_s (acknowledged), sample_rows_per_s, bytes_per_row (growth of the
holding processes' resident memory, divided by the rows; private_bytes_per_row without shared
memory such as Ray's object store arena), and ratio_to_forgetless (peer / ours, each figure). The first 1k-row batch warms each buffer and is neither timed nor counted. Medians of 3 insert trials (each in a new process and buffer) and of 5 sampling
rounds (each at least 1 s and 20 batches); every trial is in the JSON.

  python bench/peers.py --json runs/bench/peers.json [--rows 100000] [--envs DIR] [--no-install]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import add_baseline_options, baseline_report, quiet_environment, report

quiet_environment()  # before Ray is imported

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import ray  # noqa: E402

from actors.cluster import start_local_ray  # noqa: E402
from actors.replay import PrefetchingSampler, ReplayStore  # noqa: E402
from peer_runner import SAMPLE_ROWS, growth_per_row, resident_bytes, timed_round  # noqa: E402
from pipelines.config import ReplayConfig  # noqa: E402
from replay_common import payload_bytes, review_corpus  # noqa: E402

INSERT_ROWS, SHARDS, TRIALS, ROUNDS = 1000, 4, 3, 5
RUNNER = Path(__file__).with_name("peer_runner.py")

# peer -> (environment, what pip installs there, the module that must import)
PEERS: dict[str, tuple[str, list[str], str]] = {
    "rllib": ("rllib", [f"ray[rllib]=={ray.__version__}"], "ray.rllib.utils.replay_buffers"),
    "rllib_actor": ("rllib", [f"ray[rllib]=={ray.__version__}"], "ray.rllib.utils.replay_buffers"),
    "avalanche": ("avalanche", ["avalanche-lib==0.6.0"], "avalanche.training.storage_policy"),
    "reverb": ("reverb", ["dm-reverb[tensorflow]==0.14.0"], "reverb"),
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def tail(text: str, lines: int = 6) -> str:
    kept = [line for line in text.strip().splitlines() if line.strip() and not line.startswith("WARNING: Location")]
    return "\n".join(kept[-lines:])


def environment(name: str, specs: list[str], module: str, envs: Path, install: bool) -> Path:
    """The peer's Python, its environment built first if missing. Raises RuntimeError with pip's or
    the import's own words when it cannot be built or the peer does not import."""
    python = envs / name / "bin" / "python"
    check = [str(python), "-c", f"import {module}"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    if not install:
        raise RuntimeError(f"no working environment at {envs / name} (and --no-install)")
    log(f"building the {name} environment: pip install {' '.join(specs)} (once; kept in {envs / name})")
    pip_env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    pip_env["PIP_CONFIG_FILE"] = os.devnull
    for command in ([sys.executable, "-m", "venv", "--clear", str(envs / name)],
                    [str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"],
                    [str(python), "-m", "pip", "install", "-q", *specs]):
        done = subprocess.run(command, capture_output=True, text=True, env=pip_env)
        if done.returncode:
            raise RuntimeError(f"`{' '.join(command[2:] if command[1] == '-m' else command)}` failed:\n"
                               f"{tail(done.stderr or done.stdout)}")
    done = subprocess.run(check, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"installed, but `import {module}` fails:\n{tail(done.stderr)}")
    return python


def run_peer(peer: str, python: Path, rows_file: Path) -> dict:
    """TRIALS insert trials, each in a new process; the last one then samples ROUNDS rounds."""
    inserts, resident, samples = [], [], []
    for trial in range(TRIALS):
        command = [str(python), str(RUNNER), peer, "--rows", str(rows_file)]
        if trial == TRIALS - 1:
            command += ["--rounds", str(ROUNDS)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
        if done.returncode:
            raise RuntimeError(f"{peer} failed in trial {trial + 1}:\n{tail(done.stderr)}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        inserts.append(result["insert_rows_per_s"])
        resident.append((result["bytes_per_row"], result["private_bytes_per_row"]))
        samples = result.get("sample_rows_per_s", samples)
        log(f"  {peer} trial {trial + 1}: insert {result['insert_rows_per_s']:,.0f} rows/s, "
            f"{result['bytes_per_row']:,.0f} resident bytes a row ({result['private_bytes_per_row']:,.0f} private)")
    return summary(inserts, samples, resident)


def summary(inserts: list[float], samples: list[float], resident: list[tuple[float, float]]) -> dict:
    """Medians and trials; ``resident``: (resident, private) growth a row, per trial."""
    return {"insert_rows_per_s": round(statistics.median(inserts)),
            "sample_rows_per_s": round(statistics.median(samples)),
            "bytes_per_row": round(statistics.median(r[0] for r in resident), 1),
            "private_bytes_per_row": round(statistics.median(r[1] for r in resident), 1),
            "insert_trials_rows_per_s": [round(v) for v in inserts],
            "sample_trials_rows_per_s": [round(v) for v in samples],
            "bytes_per_row_trials": [round(r[0], 1) for r in resident]}


def insert_store(data: pa.Table, directory: Path | None) -> tuple[ReplayStore, float, tuple[float, float]]:
    """A new 4-shard store filled in 1k-row batches: it, its acknowledged rows/s and the shard
    processes' (resident, private) memory growth a row."""
    config = ReplayConfig(enabled=True, num_shards=SHARDS, capacity_rows=data.num_rows, remover="fifo",
                          snapshot_every_rows=None)
    store = ReplayStore.create(config, directory=directory)
    pids = [int(where["pid"]) for where in ray.get([shard.node.remote() for shard in store.shards])]
    store.insert(data.slice(0, INSERT_ROWS))  # the first batch warms the shards, as each peer's does
    before = [resident_bytes(pid) for pid in pids]
    start = time.perf_counter()
    stored = store.insert_batches(data.slice(offset, INSERT_ROWS)
                                  for offset in range(INSERT_ROWS, data.num_rows, INSERT_ROWS))
    rate = stored / (time.perf_counter() - start)
    if stored != data.num_rows - INSERT_ROWS:
        raise RuntimeError(f"the store acknowledged {stored} of {data.num_rows - INSERT_ROWS} rows")
    return store, rate, growth_per_row(before, [resident_bytes(pid) for pid in pids], stored)


def run_forgetless(data: pa.Table, workdir: Path) -> tuple[dict, dict]:
    """Ours (in memory, and with its durable log) and the in-process Arrow take, sampled in turns."""
    inserts, resident, durable = [], [], []
    for trial in range(TRIALS):
        store, rate, per_row = insert_store(data, None)
        inserts.append(rate)
        resident.append(per_row)
        arrow_bytes = sum(s.bytes for s in store.stats())
        if trial < TRIALS - 1:
            store.shutdown()
        logged, rate, _ = insert_store(data, workdir / f"log-{trial}")
        durable.append(rate)
        logged.shutdown()
        log(f"  forgetless trial {trial + 1}: insert {inserts[-1]:,.0f} rows/s in memory, {rate:,.0f} with its log; "
            f"{per_row[0]:,.0f} resident bytes a row ({per_row[1]:,.0f} private)")
    local = data.combine_chunks()
    rng = np.random.default_rng(0)
    sampler = PrefetchingSampler(store, batch_size=SAMPLE_ROWS)
    sampler.next_batch()  # the first call maps the published tables
    ours, take = [], []
    for _ in range(ROUNDS):
        ours.append(timed_round(lambda: sampler.next_batch().num_rows))
        take.append(timed_round(lambda: local.take(pa.array(rng.integers(0, local.num_rows, SAMPLE_ROWS))).num_rows))
    sampler.close()
    store.shutdown()
    forgetless = summary(inserts, ours, resident)
    forgetless["insert_rows_per_s_durable"] = round(statistics.median(durable))
    forgetless["insert_trials_rows_per_s_durable"] = [round(v) for v in durable]
    forgetless["arrow_bytes_per_row"] = round(arrow_bytes / data.num_rows, 1)
    # the limit: the rows as one Arrow table in this process. Its "insert" concatenates the batches
    # into one table (a copy); its bytes are the table's own buffers (a process's resident growth
    # cannot see a copy the allocator serves from memory it already holds).
    concat = []
    for _ in range(TRIALS):
        start = time.perf_counter()
        table = pa.concat_tables([data.slice(o, INSERT_ROWS) for o in range(0, data.num_rows, INSERT_ROWS)]
                                 ).combine_chunks()
        concat.append(data.num_rows / (time.perf_counter() - start))
    arrow = summary(concat, take, [(table.nbytes / data.num_rows,) * 2] * TRIALS)
    return forgetless, arrow


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--envs", type=Path, default=Path("~/.cache/forgetless/bench-envs").expanduser(),
                        help="where each peer's environment lives (built there on first use)")
    parser.add_argument("--no-install", action="store_true", help="use the environments there, build none")
    parser.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated, of: {', '.join(PEERS)}")
    add_baseline_options(parser)
    args = parser.parse_args()
    if args.baseline:  # the same command on this code and on REF's, side by side
        return baseline_report(__file__, args)
    chosen = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = sorted(set(chosen) - set(PEERS))
    if unknown:
        parser.error(f"unknown peer(s) {', '.join(unknown)}; choose from {', '.join(PEERS)}")

    data = review_corpus(args.rows)
    results: dict = {"rows": args.rows, "insert_batch_rows": INSERT_ROWS, "sample_batch_rows": SAMPLE_ROWS,
                     "payload_bytes_per_row": round(payload_bytes(data) / args.rows, 1), "peers": {}}
    with tempfile.TemporaryDirectory(prefix="peers-bench-") as workdir:
        rows_file = Path(workdir) / "rows.jsonl"
        with rows_file.open("w") as out:
            for offset in range(0, data.num_rows, INSERT_ROWS):
                part = data.slice(offset, INSERT_ROWS)
                out.write(json.dumps({c: part.column(c).to_pylist()
                                      for c in ("example_id", "task_id", "source", "target")}) + "\n")
        log("forgetless and the in-process Arrow take")
        start_local_ray(dashboard=False, log_to_driver=False)
        try:
            ours, arrow = run_forgetless(data, Path(workdir))
        finally:
            ray.shutdown()  # the peers run alone: rllib_actor starts a Ray of its own
        results["forgetless"] = ours
        results["peers"]["arrow_take"] = arrow
        for peer in chosen:
            name, specs, module = PEERS[peer]
            log(peer)
            try:
                python = environment(name, specs, module, args.envs, not args.no_install)
                results["peers"][peer] = run_peer(peer, python, rows_file)
            except (RuntimeError, subprocess.TimeoutExpired) as error:
                log(f"  {peer}: {error}")
                results["peers"][peer] = {"error": str(error)}
    for entry in results["peers"].values():
        if "error" not in entry:
            entry["ratio_to_forgetless"] = {
                figure: round(entry[figure] / ours[figure], 3) if ours[figure] else None
                for figure in ("insert_rows_per_s", "sample_rows_per_s", "bytes_per_row", "private_bytes_per_row")}
    return report(results, args.json)


if __name__ == "__main__":
    sys.exit(main())
