"""How a run's cost grows with the length of its stream: streams of 3, 6, 12 and 24 tiny tasks, the
run time split into start-up, training, evaluation, between-task overhead and the rest, with each
classification task scored by generation and by likelihood (evaluation.scoring), and the peak
resident memory of the trainer worker and of the run's scheduler actor during each run.

The curves are measured with the default, evaluation.cells: needed — only the cells a metric reads
(the tasks seen so far and the next one): about T^2 / 2 + 1.5 T evaluations for T tasks, so
evaluation should still grow quadratically, at half the rate of every task after every task
(``--cells all``: T x T), while training grows linearly. The longest stream is also run both ways,
alternating, ``--cells-trials`` times (generation scoring): the evaluation time of each, every
trial and the median, and the ratio of the medians beside the ratio of the cells. Every run goes to
one worker group on one local Ray (what `forgetless compare` does), so start-up is paid once and
reported apart; the worker's memory is that one process's, its peak within each run's window.

The tasks: 24 disjoint slices of the six built-in classification sets (question type, SMS spam,
four sentiment domains), 64 training and 32 eval rows each, on the tiny T5, 10 steps a task.

  python bench/stream_cost.py --json runs/bench/stream_cost.json [--plot docs/img/stream_cost.png]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import PeakMemory, add_baseline_options, baseline_report, quiet_environment, report

quiet_environment()

from actors.sweep import run_timed  # noqa: E402
from actors.cluster import connect_ray  # noqa: E402
from actors.trainer_group import WorkerGroups  # noqa: E402
from pipelines.config import load_config, resolve_paths, validate_config  # noqa: E402
from pipelines.learner import silence_library_noise  # noqa: E402
from pipelines.tasks import load_builtin  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny" / "naive.yaml"
SOURCES = ["question_type", "sms_spam", "sentiment_movies", "sentiment_tweets", "sentiment_amazon", "sentiment_nyt"]
ROWS_PER_TASK, EVAL_ROWS, STEPS = 96, 32, 10


def write_tasks(directory: Path, count: int) -> list[dict]:
    """``count`` task configs over disjoint slices of the built-in sets, written as JSONL files."""
    cache = Path("~/.cache/forgetless").expanduser()
    tables = {name: load_builtin(name, cache) for name in SOURCES}
    tasks = []
    for i in range(count):
        name, part = SOURCES[i % len(SOURCES)], i // len(SOURCES)
        rows = tables[name].slice(part * ROWS_PER_TASK, ROWS_PER_TASK)
        if rows.num_rows < ROWS_PER_TASK:
            raise RuntimeError(f"built-in set {name} has too few rows for task {i}")
        path = directory / f"task-{i:02d}.jsonl"
        path.write_text("".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in
                                zip(rows.column("source").to_pylist(), rows.column("target").to_pylist())))
        tasks.append({"name": f"t{i:02d}-{name}", "source": {"kind": "file", "path": str(path)},
                      "max_eval_examples": EVAL_ROWS, "eval_fraction": EVAL_ROWS / ROWS_PER_TASK})
    return tasks


def run_config(base: dict, tasks: list[dict], scoring: str, output_dir: Path, cells: str):
    data = json.loads(json.dumps(base))
    data["stream"]["tasks"] = tasks
    data["training"]["max_steps"] = STEPS
    data["evaluation"].update(scoring=scoring, batch_size=EVAL_ROWS, cells=cells)
    data["checkpoint"] = {"models": "last"}
    data["output_dir"] = str(output_dir)
    return resolve_paths(validate_config(data))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scorings = list(results["by_scoring"])
    lengths = [int(n) for n in results["by_scoring"][scorings[0]]]
    parts = [("train_s", "training"), ("eval_s", "evaluation"), ("between_tasks_s", "between tasks"),
             ("other_s", "the rest (baseline, checkpoints, report)")]
    fig, (bars, rows, memory) = plt.subplots(1, 3, figsize=(17, 4.5))
    width = 0.38
    colors = ["#4c72b0", "#dd8452", "#55a868", "#8c8c8c"]
    for s, scoring in enumerate(scorings):
        bottom = [0.0] * len(lengths)
        x = [i + (s - 0.5) * width for i in range(len(lengths))]
        for (key, label), color in zip(parts, colors):
            values = [results["by_scoring"][scoring][str(n)][key] for n in lengths]
            bars.bar(x, values, width * 0.95, bottom=bottom, color=color, hatch="//" if s else None,
                     edgecolor="white", label=label if s == 0 else None)
            bottom = [b + v for b, v in zip(bottom, values)]
        for xi, total in zip(x, bottom):
            bars.text(xi, total, scoring[:3], ha="center", va="bottom", fontsize=7)
    bars.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    bars.set_xlabel("tasks in the stream")
    bars.set_ylabel("seconds (start-up apart)")
    bars.set_title("Run time by part: gen = generation, lik = likelihood (hatched)")
    bars.legend(fontsize=8)
    for scoring, marker in zip(scorings, ("o", "s")):
        for key, color in (("eval_s", colors[1]), ("train_s", colors[0])):
            values = [results["by_scoring"][scoring][str(n)][key] for n in lengths]
            rows.plot(lengths, values, marker=marker, color=color, linestyle="-" if scoring == scorings[0] else "--",
                      label=f"{key.split('_')[0]}, {scoring}")
    first = results["by_scoring"][scorings[0]][str(lengths[0])]
    for power, label in ((1, "grows as T"), (2, "grows as T\u00b2")):
        guide = [first["eval_s"] * (n / lengths[0]) ** power for n in lengths]
        rows.plot(lengths, guide, color="#bbbbbb", linestyle=":", linewidth=1)
        rows.text(lengths[-1], guide[-1], label, fontsize=8, color="#888888", va="center")
    rows.set_xscale("log")
    rows.set_yscale("log")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    rows.set_xticks(lengths, [str(n) for n in lengths])
    rows.xaxis.set_minor_formatter(NullFormatter())
    rows.yaxis.set_major_formatter(ScalarFormatter())
    rows.set_xlabel("tasks in the stream (T)")
    rows.set_ylabel("seconds")
    cells = results.get("curve_cells", "all")
    rows.set_title("Training grows as T, evaluation as T\u00b2 " +
                   ("(cells: needed, ~half of T x T)" if cells == "needed" else "(every task after every task)"))
    rows.legend(fontsize=8)
    for scoring, marker in zip(scorings, ("o", "s")):
        for key, color, label in (("worker_gib", colors[0], "trainer worker"), ("scheduler_gib", colors[2], "scheduler")):
            values = [results["by_scoring"][scoring][str(n)].get("peak_rss", {}).get(key) for n in lengths]
            if all(v is not None for v in values):
                memory.plot(lengths, values, marker=marker, color=color,
                            linestyle="-" if scoring == scorings[0] else "--", label=f"{label}, {scoring}")
    memory.set_xscale("log")
    memory.set_xticks(lengths, [str(n) for n in lengths])
    memory.xaxis.set_minor_formatter(NullFormatter())
    memory.set_ylim(bottom=0)
    memory.set_xlabel("tasks in the stream (T)")
    memory.set_ylabel("peak resident memory in the run (GiB)")
    memory.set_title("Memory: the worker's and the scheduler's")
    memory.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def measure_cells(base: dict, tasks: list[dict], scoring: str, work: Path, groups: WorkerGroups,
                  trials: int) -> dict | None:
    """The stream run with evaluation.cells all and needed, alternating, ``trials`` times each: the
    evaluation seconds of every run, the medians, their ratio, and the ratio of cells measured."""
    if trials < 1:
        return None
    n = len(tasks)
    seconds: dict[str, list[float]] = {"all": [], "needed": []}
    accuracy: dict[str, set] = {"all": set(), "needed": set()}
    for k in range(trials):
        for cells in ("all", "needed"):
            config = run_config(base, tasks, scoring, work / f"cells-{cells}-{k}", cells)
            run = run_timed(config, groups, progress=False)
            if run.failure is not None:
                raise RuntimeError(f"cells {cells}, trial {k}: {run.failure}")
            seconds[cells].append(round(sum(run.report.train[t].eval_seconds for t in run.report.tasks), 2))
            accuracy[cells].add(round(run.report.metrics["avg_acc"], 6))
            print(f"cells {cells:>6}, {n} tasks, trial {k + 1}/{trials}: evaluation {seconds[cells][-1]} s",
                  file=sys.stderr, flush=True)
    medians = {cells: statistics.median(values) for cells, values in seconds.items()}
    return {"tasks": n, "scoring": scoring, "trials": trials, "eval_s": seconds, "median_eval_s": medians,
            "ratio_of_medians": round(medians["needed"] / medians["all"], 3),
            "cells_ratio": round((n * (n + 3) / 2 - 1) / n**2, 3),
            "same_avg_acc": accuracy["all"] == accuracy["needed"] and len(accuracy["all"]) == 1}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path, help="write the cost curves here (PNG)")
    parser.add_argument("--lengths", default="3,6,12,24")
    parser.add_argument("--scorings", default="generate,likelihood")
    parser.add_argument("--cells", choices=("needed", "all"), default="needed",
                        help="evaluation.cells of the curves (default: needed, the config's default)")
    parser.add_argument("--cells-trials", type=int, default=3,
                        help="runs of the longest stream with evaluation.cells all and needed, alternating (0: none)")
    add_baseline_options(parser)
    args = parser.parse_args()
    if args.baseline:  # the same command on this code and on REF's, side by side
        return baseline_report(__file__, args)
    silence_library_noise()
    lengths = [int(n) for n in args.lengths.split(",")]
    scorings = args.scorings.split(",")
    work = Path(tempfile.mkdtemp(prefix="stream-cost-"))
    tasks = write_tasks(work, max(lengths))
    base = load_config(CONFIG, [f"mlflow.tracking_uri=sqlite:///{work}/mlflow.db"]).model_dump(mode="json")
    began = time.perf_counter()
    connect_ray(resolve_paths(validate_config(base)))
    ray_s = time.perf_counter() - began
    groups = WorkerGroups(work / "ray", name="stream-cost")
    results: dict = {"config": str(CONFIG.relative_to(REPO)), "curve_cells": args.cells, "steps_per_task": STEPS,
                     "train_rows_per_task":
                     ROWS_PER_TASK - EVAL_ROWS, "eval_rows_per_task": EVAL_ROWS, "ray_start_s": round(ray_s, 1),
                     "by_scoring": {}}
    try:
        for scoring in scorings:
            key = scoring
            results["by_scoring"][key] = {}
            for n in lengths:
                config = run_config(base, tasks[:n], scoring, work / key / f"tasks-{n}", args.cells)
                worker, scheduler = PeakMemory("RayTrainWorker"), PeakMemory("ray::Scheduler")
                run = run_timed(config, groups, progress=False)
                memory = {"worker_gib": worker.stop()["worker_peak_gib"],
                          "scheduler_gib": scheduler.stop()["worker_peak_gib"]}
                if run.failure is not None:
                    print(f"{key}, {n} tasks failed: {run.failure}", file=sys.stderr)
                    return 1
                stats = [run.report.train[t] for t in run.report.tasks]
                train = sum(s.seconds for s in stats)
                evaluate = [s.eval_seconds for s in stats]
                between = sum(run.report.between_task_overhead_s)
                entry = {"wall_s": round(run.wall_s, 1), "startup_s": round(run.startup_s, 1),
                         "train_s": round(train, 1), "eval_s": round(sum(evaluate), 1),
                         "between_tasks_s": round(between, 1),
                         "other_s": round(run.seconds - train - sum(evaluate) - between, 1),
                         "eval_s_per_row": [round(e, 3) for e in evaluate],
                         "peak_rss": memory,
                         "avg_acc": round(run.report.metrics["avg_acc"], 3),
                         "learning_acc": round(run.report.metrics["learning_acc"], 3)}
                results["by_scoring"][key][str(n)] = entry
                print(f"{key:>10}, {n:>2} tasks: wall {entry['wall_s']} s (start-up {entry['startup_s']}), "
                      f"train {entry['train_s']}, eval {entry['eval_s']}, between tasks {entry['between_tasks_s']}, "
                      f"rest {entry['other_s']}; worker {memory['worker_gib']} GiB, scheduler {memory['scheduler_gib']} GiB; "
                      f"avg_acc {entry['avg_acc']}", file=sys.stderr, flush=True)
        results["cells"] = measure_cells(base, tasks[: max(lengths)], scorings[0], work, groups, args.cells_trials)
    finally:
        groups.close()
    for scoring, by_length in results["by_scoring"].items():
        if {str(lengths[0]), str(lengths[-1])} <= set(by_length):
            first, last = by_length[str(lengths[0])], by_length[str(lengths[-1])]
            factor = lengths[-1] / lengths[0]
            # linear growth gives `factor`, quadratic factor**2
            results.setdefault("growth", {})[scoring] = {
                "tasks": f"{lengths[0]} -> {lengths[-1]}", "linear_would_be": factor, "quadratic_would_be": factor ** 2,
                "train_s": round(last["train_s"] / first["train_s"], 2),
                "eval_s": round(last["eval_s"] / first["eval_s"], 2)}
    if {"generate", "likelihood"} <= set(results["by_scoring"]):
        results["likelihood_vs_generate_eval_s"] = {
            n: round(results["by_scoring"]["likelihood"][n]["eval_s"] / results["by_scoring"]["generate"][n]["eval_s"], 3)
            for n in results["by_scoring"]["generate"]}
    if args.plot:
        plot(results, args.plot)
    return report(results, args.json)


if __name__ == "__main__":
    sys.exit(main())
