"""The chaos run: a 6-task tiny replay stream on Ray's multi-node test cluster (a head and three
one-CPU nodes, all on this machine), killed at seeded moments, then compared with the same run
undisturbed.

Each trial is one `forgetless run` (2 trainer workers, ZeRO-2, replay, `checkpoint.every_n_steps`)
with one kill, at a seeded moment of its training: SIGKILL of a trainer worker, of a replay shard,
of the scheduler actor, of a whole node (its raylet and every process on it; a fresh node joins
after, as an autoscaler would add one), or of the driver (then `forgetless resume`, as
`forgetless job` does). Per trial: did the run finish by itself, the seconds it took beyond the
undisturbed run, the steps it redid (report.json's restarts), and against the undisturbed run:
matrix cells off by more than one eval example, replay rows lost or doubled (row ids), MLflow
train-loss steps logged twice, MLflow runs used.

  python bench/chaos.py --kills 5 --seed 0 --json runs/bench/chaos.json   # one kill of each kind
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import add_baseline_options, baseline_report, quiet_environment, report, spread

quiet_environment()

import psutil  # noqa: E402
import ray  # noqa: E402
import yaml  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KINDS = ("worker", "shard", "scheduler", "node", "driver")
TASKS = ("question_type", "sms_spam", "sentiment_movies", "sentiment_tweets", "sentiment_amazon", "sentiment_nyt")
EVAL_EXAMPLES = 48
RESTARTED_BY = ("worker", "node", "scheduler")  # kills the run heals with a recorded restart (a shard heals in the store)


def stream_config(out: Path, mlflow_uri: str, address: str, steps: int, tasks: int) -> dict[str, Any]:
    return {
        "experiment": "chaos", "seed": 0, "output_dir": str(out),
        "model": {"arch": "t5", "preset": "tiny", "tokenizer": {"vocab_size": 600}},
        "stream": {"max_source_tokens": 48, "max_target_tokens": 8,
                   "tasks": [{"name": t, "source": {"kind": "builtin", "name": t}, "max_train_examples": 256,
                              "max_eval_examples": EVAL_EXAMPLES} for t in TASKS[:tasks]]},
        "training": {"num_workers": 2, "zero_stage": 2, "micro_batch_size": 16, "max_steps": steps, "lr": 3e-3,
                     "log_every_n_steps": 1, "max_failures": 3},
        "evaluation": {"batch_size": 48, "max_new_tokens": 6},
        "strategy": {"name": "replay", "replay_ratio": 0.25},
        "replay": {"enabled": True, "num_shards": 2, "rows_per_task": 32},
        "checkpoint": {"models": "last", "every_n_steps": 10},
        "recovery": {"enabled": False},
        "mlflow": {"tracking_uri": mlflow_uri},
        "ray": {"address": address},
    }


def shared_tokenizer(config: dict[str, Any], work: Path) -> Path:
    from pipelines.config import validate_config
    from pipelines.models import stream_tokenizer
    from pipelines.tasks import load_stream

    validated = validate_config(config)
    target = work / "tokenizer"
    stream_tokenizer(validated.model, load_stream(validated)).save_pretrained(target)
    return target


def cluster_processes(gcs: str, title: str) -> list[psutil.Process]:
    """This cluster's Ray worker processes whose title holds ``title``."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        line = " ".join(process.info["cmdline"] or ())
        if title in line and (gcs in line or "ray::" in line):
            found.append(process)
    return found


def start_cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "actors.cli", *args, "--no-progress"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def training_started(out: Path) -> bool:
    try:
        return json.loads((out / "report.json").read_text())["finished_tasks"] >= 0 and \
            json.loads((out / "acc_matrix.json").read_text())["baseline"][0] is not None
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return False


def run_report(out: Path) -> dict[str, Any] | None:
    """The run's report.json as it stands; None before it exists (or while it cannot be read)."""
    try:
        return json.loads((out / "report.json").read_text())
    except (OSError, ValueError):
        return None


def progress(out: Path) -> tuple[int, int] | None:
    """How far the run's commit record is: finished tasks, and steps of its last mid-task state."""
    if (report_data := run_report(out)) is None:
        return None
    mid = report_data["resume"].get("mid_task") or {}
    return report_data["finished_tasks"], mid.get("steps_done", 0)


def restarts_recorded(out: Path) -> int:
    """The restarts report.json records so far."""
    try:
        return len((run_report(out) or {})["restarts"])
    except (KeyError, TypeError):
        return 0


def run_trial(cluster: Cluster, nodes: list, config: dict[str, Any], work: Path, name: str,
              kills: list[tuple[str, float]], rng: random.Random) -> dict[str, Any]:
    """One run, killed at each (kind, seconds into training) of ``kills`` in turn (none: undisturbed).
    A killed driver is followed by `forgetless resume`, as `forgetless job` would run it."""
    out = work / name
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**config, "output_dir": str(out)}))
    gcs = cluster.address
    started = time.monotonic()
    run = start_cli("run", str(path))
    kinds = ",".join(kind for kind, _ in kills) or None
    while not training_started(out):
        if run.poll() is not None:
            return {"kill": kinds, "finished": False, "error": run.stderr.read()[-2000:]}
        time.sleep(0.2)
    trained_from = time.monotonic()
    killed, resumed, last = [], 0, None
    for kind, at_s in kills:
        # at its moment, and once the run has committed something since the kill before (it recovered)
        while (time.monotonic() - trained_from < at_s or progress(out) == last) and run.poll() is None:
            time.sleep(0.1)
        if run.poll() is not None:
            break
        last, before = progress(out), restarts_recorded(out)
        killed.append(do_kill(kind, cluster, nodes, gcs, run, rng))
        if kind in RESTARTED_BY:
            # The next kill waits for this one's restart to be recorded: a commit alone can be the dying
            # attempt's last one, and a scheduler killed before the group's restart registers folds that
            # restart into its own rebuild, where the node's dead worker goes unnamed.
            deadline = time.monotonic() + 180
            while restarts_recorded(out) <= before and run.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            last = progress(out)
        elif kind == "driver":
            run.wait()
            resumed += 1
            run = start_cli("resume", str(out))
            while not cluster_processes(gcs, "RayTrainWorker") and run.poll() is None:
                time.sleep(0.2)  # the next kill lands in the resumed run's training, not its start-up
    err = run.communicate()[1]
    code = run.returncode
    wall = time.monotonic() - started
    result = {"kill": kinds, "killed": killed, "at_s": [round(at, 1) for _, at in kills], "exit": code,
              "wall_s": round(wall, 1), "train_s": round(time.monotonic() - trained_from, 1), "resumes": resumed}
    if code != 0:
        result.update(finished=False, error=err[-2000:])
        return result
    report_data = json.loads((out / "report.json").read_text())
    result.update(finished=report_data["complete"], report=report_data, out=str(out))
    return result


def do_kill(kind: str, cluster: Cluster, nodes: list, gcs: str, run: subprocess.Popen, rng: random.Random) -> str:
    if kind == "driver":
        run.send_signal(signal.SIGKILL)
        return f"driver pid {run.pid}"
    if kind == "node":
        # A node with a trainer worker, and of those the ones holding most of the run's other actors
        # (the scheduler, the run queue, shards, Ray Train's): the worst node to lose.
        trainers = {p.pid for p in cluster_processes(gcs, "RayTrainWorker")}
        actors = {p.pid for p in cluster_processes(gcs, "ray::") if "ray::IDLE" not in " ".join(p.info["cmdline"] or ())}
        victims = [n for n in nodes if any(p in trainers for p in _pids_of_node(n))] or nodes
        most = max(len(_pids_of_node(n) & actors) for n in victims)
        node = rng.choice([n for n in victims if len(_pids_of_node(n) & actors) == most])
        cluster.remove_node(node, allow_graceful=False)
        nodes.remove(node)
        nodes.append(cluster.add_node(num_cpus=1))  # the replacement an autoscaler would start
        return f"node {node.node_id[:8]}"
    title = {"worker": "RayTrainWorker", "shard": "_PlacedShard", "scheduler": "ray::Scheduler"}[kind]
    deadline = time.monotonic() + 120  # after an earlier kill, its kind may still be starting again
    while not (candidates := cluster_processes(gcs, title)) and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if not candidates:
        return f"no {title} process found"
    victim = rng.choice(candidates)
    victim.kill()
    return f"{title} pid {victim.pid}"


def _pids_of_node(node) -> set[int]:
    """Processes under a node's raylet (the workers it started)."""
    try:
        raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
        return {p.pid for p in raylet.children(recursive=True)}
    except (psutil.Error, KeyError, IndexError, AttributeError):
        return set()


def replay_ids(out: Path, config: dict[str, Any]) -> list[str]:
    from actors.replay import ReplayStore
    from pipelines.config import ReplayConfig

    store = ReplayStore.create(ReplayConfig(**config["replay"]), directory=out / "replay", seed=0,
                               name=f"chaos-read-{out.name}")
    try:
        return sorted(store.rows().column("example_id").to_pylist())
    finally:
        store.shutdown()


def train_loss_steps(uri: str, run_id: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    return [m.step for m in MlflowClient(uri).get_metric_history(run_id, "train_loss")]


def mlflow_runs_of(uri: str, experiment_id: str, out: Path) -> int:
    """The MLflow runs that name ``out`` as their output directory (one, if every attempt reopened it)."""
    from mlflow.tracking import MlflowClient

    runs = MlflowClient(uri).search_runs([experiment_id], max_results=1000)
    return sum(1 for r in runs if r.data.tags.get("forgetless.output_dir") == str(out))


def compare(trial: dict[str, Any], base: dict[str, Any], config: dict[str, Any], uri: str,
            base_ids: list[str]) -> None:
    report_data, reference = trial["report"], base["report"]
    off = 0
    for row, ref_row in zip(report_data["acc_matrix"], reference["acc_matrix"]):
        for value, ref in zip(row, ref_row):
            if (value is None) != (ref is None) or (value is not None and abs(value - ref) > 1 / EVAL_EXAMPLES + 1e-9):
                off += 1
    ids = replay_ids(Path(trial["out"]), config)
    steps = train_loss_steps(uri, report_data["mlflow"]["run_id"])
    restarts = report_data["restarts"]
    trial.update(
        cells_off_by_more_than_one_example=off,
        replay_rows_lost=len(set(base_ids) - set(ids)), replay_rows_extra=len(ids) - len(set(ids)) + len(
            set(ids) - set(base_ids)),
        steps_logged_twice=len(steps) - len(set(steps)), mlflow_runs=mlflow_runs_of(
            uri, report_data["mlflow"]["experiment_id"], Path(trial["out"])),
        restarts=len(restarts), died=[death for r in restarts for death in r["died"]],
        reasons=[reason for r in restarts for reason in r["reasons"]],
        steps_redone=[r["steps_redone"] for r in restarts],
        seconds_lost=round(trial["wall_s"] - base["wall_s"], 1))
    del trial["report"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=5, help="trials, one kill each (kinds in turn, seeded order)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per task")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--per-run", type=int, default=1, help="kills in each disturbed run (in turn, seeded moments)")
    parser.add_argument("--tasks", type=int, default=len(TASKS), help=f"tasks in the stream (at most {len(TASKS)})")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--work", type=Path, default=None, help="keep the runs here (default: a temporary directory)")
    add_baseline_options(parser)
    args = parser.parse_args()
    if args.baseline:  # the same command on this code and on REF's, side by side
        return baseline_report(__file__, args)
    rng = random.Random(args.seed)
    kinds = [k for k in args.kinds.split(",") if k]
    order = [kinds[i % len(kinds)] for i in range(args.kills)]
    rng.shuffle(order)

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "dashboard_host": "127.0.0.1",
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 3,
                           "health_check_timeout_ms": 500, "enable_metrics_collection": False}})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(3)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory(prefix="forgetless-chaos-") as tmp:
            work = args.work or Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            uri = f"sqlite:///{work / 'mlflow.db'}"
            config = stream_config(work / "x", uri, cluster.address, args.steps, args.tasks)
            # One tokenizer for every trial, trained once: the tokenizers library's Unigram trainer
            # gives slightly different vocabularies in different processes (see docs/benchmarks.md),
            # which alone moves a few cells between two undisturbed runs.
            config["model"]["tokenizer"]["name_or_path"] = str(shared_tokenizer(config, work))
            base = run_trial(cluster, nodes, config, work, "undisturbed", [], rng)
            if not base.get("finished"):
                print(json.dumps(base, indent=2))
                return 1
            base_ids = replay_ids(Path(base["out"]), config)
            train_s = base["train_s"]
            trials = []
            runs = [order[i:i + args.per_run] for i in range(0, len(order), args.per_run)]
            for i, kinds_here in enumerate(runs):
                moments = sorted(rng.uniform(0.1, 0.7) * train_s for _ in kinds_here)
                kills = list(zip(kinds_here, moments))
                print(f"trial {i + 1}/{len(runs)}: " + ", ".join(f"{k} at {at:.0f} s" for k, at in kills) +
                      " of training", file=sys.stderr, flush=True)
                trial = run_trial(cluster, nodes, config, work, f"trial-{i:02d}", kills, rng)
                if trial.get("finished"):
                    compare(trial, base, config, uri, base_ids)
                trial.pop("out", None)
                trials.append(trial)
                print(json.dumps({k: v for k, v in trial.items() if k != "error"}), file=sys.stderr, flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    per_kind = {}
    for kind in kinds + ([] if args.per_run == 1 else [",".join(r) for r in runs]):
        these = [t for t in trials if t["kill"] == kind]
        if these:
            done = [t for t in these if t.get("finished")]
            per_kind[kind] = {
                "trials": len(these), "recovered": len(done),
                "seconds_lost": spread([t["seconds_lost"] for t in done], 1) if done else None,
                "steps_redone": [t["steps_redone"] for t in done],
                "cells_off": sum(t["cells_off_by_more_than_one_example"] for t in done),
                "replay_rows_lost": sum(t["replay_rows_lost"] for t in done),
                "replay_rows_extra": sum(t["replay_rows_extra"] for t in done),
                "steps_logged_twice": sum(t["steps_logged_twice"] for t in done),
                "extra_mlflow_runs": sum(t["mlflow_runs"] - 1 for t in done)}
    return report({"setup": {"tasks": args.tasks, "per_run": args.per_run, "steps_per_task": args.steps, "workers": 2, "nodes": "head + 3 x 1 CPU",
                             "checkpoint_every_n_steps": 10, "seed": args.seed, "kills": args.kills},
                   "undisturbed_wall_s": base["wall_s"], "per_kind": per_kind, "trials": trials}, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
