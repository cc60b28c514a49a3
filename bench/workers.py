"""One trainer worker against two on this machine: the tiny stream (configs/tiny/naive.yaml)
through `forgetless run` with training.num_workers 1 and 2, interleaved rounds, each a fresh run
(its own local Ray), as a user runs it. Per setting: training seconds a task (median of every task
of every round, and all of them), rows trained per second of each task (a step trains micro-batch x
workers rows), and the run's wall time (median, every trial); the ratios of two workers' to one's.

  python bench/workers.py --json runs/bench/workers.json [--plot docs/img/workers.png] [--repeats 3]
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

from common import add_baseline_options, baseline_report, quiet_environment, report, spread

quiet_environment()

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny" / "naive.yaml"


def run(workers: int, work: Path, round_: int) -> dict:
    out = work / f"w{workers}-r{round_}"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("RAY_ADDRESS", None)
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "actors.cli", "run", str(CONFIG), f"output_dir={out}",
                           f"training.num_workers={workers}", f"mlflow.tracking_uri=sqlite:///{work / 'mlflow.db'}",
                           "--no-progress"], cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - began
    if done.returncode != 0:
        raise RuntimeError(f"{workers} worker(s), round {round_}: {done.stderr[-2000:]}")
    data = json.loads((out / "report.json").read_text())
    stats = [data["train"][task] for task in data["tasks"]]
    return {"wall_s": wall, "task_s": [s["seconds"] for s in stats], "steps": [s["steps"] for s in stats]}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(results["by_workers"])
    fig, (rate, wall) = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, label in ((rate, "rows_per_s", "rows trained per second"), (wall, "wall_s", "wall time of the run (s)")):
        medians = [results["by_workers"][w][key]["median"] for w in settings]
        ax.bar(settings, medians, color=["#4c72b0", "#dd8452"], width=0.5)
        for i, w in enumerate(settings):
            trials = results["by_workers"][w][key]["trials"]
            ax.scatter([i] * len(trials), trials, color="black", s=12, zorder=3)
        ax.set_xlabel("trainer workers")
        ax.set_ylabel(label)
    rate.set_title(f"Training: {results['rows_per_s_ratio']}x the rows/s with 2")
    wall.set_title("The run: start-up is most of it")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds of both settings")
    add_baseline_options(parser)
    args = parser.parse_args()
    if args.baseline:  # the same command on this code and on REF's, side by side
        return baseline_report(__file__, args)
    work = Path(tempfile.mkdtemp(prefix="workers-bench-"))
    micro_batch = 16  # configs/tiny/naive.yaml's training.micro_batch_size
    runs: dict[int, list[dict]] = {1: [], 2: []}
    for round_ in range(args.repeats):  # interleaved: the machine's drift hits both alike
        for workers in runs:
            runs[workers].append(run(workers, work, round_))
            last = runs[workers][-1]
            print(f"round {round_ + 1}/{args.repeats}, {workers} worker(s): wall {last['wall_s']:.1f} s, "
                  f"tasks {[round(t, 2) for t in last['task_s']]} s", file=sys.stderr, flush=True)
    results: dict = {"config": str(CONFIG.relative_to(REPO)), "rounds": args.repeats, "by_workers": {}}
    for workers, trials in runs.items():
        task_s = [t for trial in trials for t in trial["task_s"]]
        rows_per_task = statistics.median([s for trial in trials for s in trial["steps"]]) * micro_batch * workers
        results["by_workers"][str(workers)] = {
            "task_s": spread(task_s), "rows_per_task": rows_per_task,
            "rows_per_s": spread([rows_per_task / t for t in task_s], 0),
            "wall_s": spread([trial["wall_s"] for trial in trials], 1)}
    one, two = results["by_workers"]["1"], results["by_workers"]["2"]
    results["rows_per_s_ratio"] = round(two["rows_per_s"]["median"] / one["rows_per_s"]["median"], 2)
    results["wall_ratio"] = round(two["wall_s"]["median"] / one["wall_s"]["median"], 2)
    if args.plot:
        plot(results, args.plot)
    return report(results, args.json)


if __name__ == "__main__":
    sys.exit(main())
