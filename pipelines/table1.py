"""The lecture's Table 1, regenerated from runs: what each paradigm trains, how it uses more task
data, what adding a task costs and does to the first one, and how well it does.

Plain data in, plain data out: ``actors.table1`` runs the streams; this module makes each run's
config and turns the run reports into ``table1.json`` and ``table1.md``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipelines.config import RunConfig, validate_config
from pipelines.strategies import DEFAULT_STRATEGY
from pipelines.paradigms import few_shot_sources, query_text
from pipelines.report import RunReport
from pipelines.tasks import TaskStream

# The lecture's words (Table 1, "Story of fine-tuning so far"), row by row.
LECTURE: dict[str, dict[str, str]] = {
    "parameters": {"feature_extraction": "Small to Medium", "fine_tuning": "Huge", "prompt_engineering": "None",
                   "prompt_tuning": "Small"},
    "task_data": {"feature_extraction": "Small to Huge", "fine_tuning": "Small to Huge", "prompt_engineering": "Small",
                  "prompt_tuning": "Small to Huge"},
    "multi_task": {"feature_extraction": "Good", "fine_tuning": "Bad", "prompt_engineering": "Good",
                   "prompt_tuning": "Good"},
    "performance": {"feature_extraction": "OK", "fine_tuning": "Good", "prompt_engineering": "Bad to OK",
                    "prompt_tuning": "Good"},
}
TITLES = {"feature_extraction": "Feature extraction", "fine_tuning": "Fine-tuning",
          "prompt_engineering": "Prompt engineering", "prompt_tuning": "Prompt tuning"}


def size_label(size: int | None) -> str:
    return "all" if size is None else str(size)


def ordered_sizes(sizes: list[int | None]) -> list[int | None]:
    """Smallest first; ``None`` (the whole training split) last."""
    return sorted(sizes, key=lambda s: (s is None, s or 0))


def run_config(config: RunConfig, paradigm: str, size: int | None, *, output_dir: str,
               parent_run_id: str | None) -> RunConfig:
    """One cell of the table: ``config`` under ``paradigm``, every task cut to ``size`` training rows,
    trained one task after another with nothing against forgetting (strategy naive): the table
    compares ways of reusing the model, not strategies."""
    data = config.model_dump(by_alias=True)
    data["paradigm"] = {**data["paradigm"], "name": paradigm}
    data["strategy"] = {"name": DEFAULT_STRATEGY}
    if paradigm != "fine_tuning":
        data["recovery"]["enabled"] = False
        data["replay"]["enabled"] = False
    if config.paradigm.model_copy(update={"name": paradigm}).has_task_parameters:
        data["evaluation"]["mix_tasks"] = False  # a head or a prompt per task: one task a batch
    for task in data["stream"]["tasks"]:
        if size is not None:
            task["max_train_examples"] = min(size, task["max_train_examples"] or size)
    data["output_dir"] = output_dir
    data["mlflow"]["parent_run_id"] = parent_run_id
    data["mlflow"]["run_name"] = f"{paradigm}-{size_label(size)}-rows"
    return validate_config(data, origin=f"table1 ({paradigm}, {size_label(size)} training rows per task)")


def shot_bytes(config: RunConfig, stream: TaskStream) -> float:
    """Prompt engineering's per-task storage: the mean UTF-8 bytes of the in-context examples before
    an evaluated input (0 at zero-shot)."""
    paradigm = config.paradigm
    sizes = []
    for index, task in enumerate(stream):
        if not task.trainable:
            continue
        prompts = few_shot_sources(paradigm, task, seed=config.seed, index=index)
        for prompt, source in zip(prompts, task.sources("eval")):
            tail = query_text(paradigm, source) if paradigm.shots else source
            sizes.append(len(prompt.encode()) - len(tail.encode()))
    return float(np.mean(sizes)) if sizes else 0.0


def _first_task(report: RunReport, first: str) -> dict[str, float | None]:
    j = report.tasks.index(first)
    rows = [row for row in report.acc_matrix if row]
    learned = report.acc_matrix[j][j] if j < len(report.acc_matrix) else None
    return {"when_learned": learned, "after_stream": rows[-1][j] if rows else None}


def summarize(paradigm: str, reports: dict[str, RunReport], *, first_task: str, eval_examples: int,
              stored_text_bytes: float | None = None) -> dict[str, Any]:
    """One paradigm's column from its runs (keyed by size label, smallest first; the last is the
    largest, whose stream gives the per-task costs and the forgetting)."""
    finished = {label: r for label, r in reports.items() if r.status == "FINISHED"}
    entry: dict[str, Any] = {
        "runs": {label: {"status": r.status, "output_dir": r.output_dir, "run_id": r.mlflow.run_id,
                         "seconds": r.seconds, "error": r.error} for label, r in reports.items()},
        "acc_by_train_size": {label: r.metrics.get("learning_acc") for label, r in finished.items()},
        "avg_acc_by_train_size": {label: r.metrics.get("avg_acc") for label, r in finished.items()},
        "seconds": round(sum(r.seconds for r in reports.values()), 1),
        "seconds_by_train_size": {label: r.seconds for label, r in reports.items()},
    }
    largest = reports[list(reports)[-1]]
    stats = [s for s in (largest.train.get(t) for t in largest.tasks) if s is not None and s.trainable_params is not None]
    per_task = {t: largest.train[t].trainable_params for t in largest.tasks if t in largest.train}
    entry["trainable_params"] = int(round(np.mean([s.trainable_params for s in stats]))) if stats else None
    entry["trainable_params_per_task"] = per_task
    if paradigm == "prompt_engineering":
        entry["bytes_per_task"] = round(stored_text_bytes or 0.0, 1)
        entry["bytes_per_task_is"] = "text of the in-context examples"
    else:
        entry["bytes_per_task"] = int(round(np.mean([s.trainable_bytes or 0 for s in stats]))) if stats else None
        entry["bytes_per_task_is"] = "a whole model copy" if paradigm == "fine_tuning" else "the task's own weights"
    entry["forgetting"] = largest.metrics.get("forgetting") if largest.status == "FINISHED" else None
    entry["first_task"] = _first_task(largest, first_task) if largest.acc_matrix else None
    trained = [s for s in stats if s.steps]
    train_seconds = sum(s.seconds for s in trained)
    entry["train_examples_per_s"] = (round(sum(s.examples for s in trained) / train_seconds, 1)
                                     if trained and train_seconds else None)
    evals = [s.eval_seconds for s in (largest.train.get(t) for t in largest.tasks) if s is not None and s.eval_seconds]
    entry["eval_examples_per_s"] = round(eval_examples * len(evals) / sum(evals), 1) if evals else None
    return entry


def _num(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def _bytes(value: float | None) -> str:
    if value is None:
        return "n/a"
    for unit, scale in (("MB", 1e6), ("KB", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} B"


def format_table(table: dict[str, Any]) -> str:
    """The lecture's rows, each with the lecture's word and the measured figure, a column per paradigm."""
    columns = table["paradigms"]
    names = list(columns)
    full = columns.get("fine_tuning", {}).get("trainable_params")
    sizes = table["train_sizes"]

    def params(entry: dict[str, Any]) -> str:
        n = entry["trainable_params"]
        if n is None:
            return "n/a"
        share = f" ({100 * n / full:.2g}% of the model)" if full and n and n != full else ""
        return f"{n:,}{share}"

    def data(entry: dict[str, Any]) -> str:
        return " / ".join(_num(entry["acc_by_train_size"].get(label), ".2f") for label in sizes)

    def scaling(entry: dict[str, Any]) -> str:
        first = entry["first_task"] or {}
        return (f"{_bytes(entry['bytes_per_task'])} per task; forgetting {_num(entry['forgetting'])}; first task "
                f"{_num(first.get('when_learned'), '.2f')} -> {_num(first.get('after_stream'), '.2f')}")

    def performance(entry: dict[str, Any]) -> str:
        last = sizes[-1]
        return (f"learning acc {_num(entry['acc_by_train_size'].get(last))}; "
                f"final avg acc {_num(entry['avg_acc_by_train_size'].get(last))}")

    def cost(entry: dict[str, Any]) -> str:
        speed = entry["train_examples_per_s"]
        return f"{entry['seconds']:.0f} s; " + (f"{speed:,.0f} train ex/s" if speed else "no training") + \
            f"; {_num(entry['eval_examples_per_s'], ',.0f')} eval ex/s"

    rows = [("Number of parameters that need to be trained", "parameters", params),
            (f"Amount of task-specific training data it can handle (learning acc at {' / '.join(sizes)} rows per task)",
             "task_data", data),
            ("Multi task scalability (bytes stored per added task; forgetting over the stream)", "multi_task", scaling),
            ("Performance on desired task", "performance", performance)]
    lines = [f"Stream: {' -> '.join(table['tasks'])}; model: {table['model']}; seed {table['seed']}; each task "
             "trained one after another (strategy naive).", "",
             "| | " + " | ".join(TITLES[n] for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for title, key, measured in rows:
        lines.append(f"| {title} — lecture | " + " | ".join(LECTURE[key][n] for n in names) + " |")
        lines.append("| measured | " + " | ".join(measured(columns[n]) for n in names) + " |")
    lines.append("| Wall time over the sizes; speed at the largest | " + " | ".join(cost(columns[n]) for n in names) + " |")
    failed = [f"{n} at {label} rows: {run['error']}" for n in names for label, run in columns[n]["runs"].items()
              if run["status"] != "FINISHED"]
    if failed:
        lines += ["", "Runs that did not finish: " + "; ".join(failed)]
    lines += ["", "learning acc = mean accuracy on each task just after training it; forgetting = mean over earlier "
              "tasks of the best accuracy from the task's own training until before the last task minus the accuracy "
              "after it; bytes per task: what "
              "serving one more task stores (fine-tuning: a model copy, the frozen paradigms: one head or prompt, "
              "prompt engineering: the in-context examples' text)."]
    return "\n".join(lines) + "\n"
