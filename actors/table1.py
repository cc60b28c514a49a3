"""``forgetless table1``: every paradigm of the lecture's Table 1 on the same model and tasks, at
several training-set sizes; one MLflow parent run with a child run per (paradigm, size).

Writes ``<output_dir>/table1.json`` (a column per paradigm: ``trainable_params``,
``bytes_per_task``, ``acc_by_train_size``, ``forgetting``, ``seconds`` and more) and
``table1.md`` (the lecture's rows, its words beside the measured figures).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from actors.compare import TimedRun, run_timed, startup_summary
from actors.launch import ModelStart, resolve_start
from actors.tracking import MlflowSink, check_tracking
from actors.trainer_group import WorkerGroups
from pipelines.config import RunConfig, experiment_dict, flatten, resolve_paths
from pipelines.errors import DataError
from pipelines.models import stream_tokenizer
from pipelines.paradigms import check_paradigm, check_prompt_lengths, eval_sets
from pipelines.report import RunReport
from pipelines.table1 import format_table, ordered_sizes, run_config, shot_bytes, size_label, summarize
from pipelines.tasks import TaskStream, load_stream
from storage.files import write_atomic

log = logging.getLogger("forgetless")


def _check_cells(cells: list[tuple[str, int | None, RunConfig]], start: ModelStart) -> dict[int | None, TaskStream]:
    """Load each size's tasks once and refuse, before the first run, what a paradigm cannot do with
    them: a label set for feature extraction; enough training rows for the shots, and k-shot prompts
    that fit, under the tokenizer that cell's run will build."""
    streams: dict[int | None, TaskStream] = {}
    for paradigm, size, config in cells:
        if size not in streams:
            streams[size] = load_stream(config)
        stream = streams[size]
        where = f"table1 ({paradigm}, {size_label(size)} training rows per task)"
        try:
            check_paradigm(config, stream)
            if paradigm == "prompt_engineering":
                tokenizer = stream_tokenizer(config.model, stream, start.checkpoint)
                check_prompt_lengths(config, eval_sets(config, stream), tokenizer)
        except DataError as exc:
            raise DataError(f"{where}: {exc}") from None
    return streams


def _model_name(config: RunConfig) -> str:
    model = config.model
    for key in ("name_or_path", "pretrain", "encoder"):
        if getattr(model, key):
            return f"{model.arch} {key} {getattr(model, key)} ({model.weights} weights)"
    return f"{model.arch} preset {model.preset} (random init)"


def table1(config: RunConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run every (paradigm, size) of ``config.table1``; returns the table written to disk."""
    config = resolve_paths(config)
    check_tracking(config.mlflow.tracking_uri)
    base = Path(config.output_dir)
    paradigms, sizes = config.table1.paradigms, ordered_sizes(config.table1.train_sizes)
    cells = [(p, s, run_config(config, p, s, output_dir=str(base / p / f"size-{size_label(s)}"), parent_run_id=None))
             for p in paradigms for s in sizes]
    start = resolve_start(config, progress=progress)  # a pretrained start is built or fetched once, before the runs
    streams = _check_cells(cells, start)
    base.mkdir(parents=True, exist_ok=True)
    parent = MlflowSink.start(config.mlflow.tracking_uri, config.mlflow.experiment_name,
                              run_name=config.mlflow.run_name or f"{config.experiment}-table1",
                              tags={"forgetless.table1": ",".join(paradigms)})
    parent.log_params({**flatten(experiment_dict(config))})
    reports: dict[str, dict[str, RunReport]] = {p: {} for p in paradigms}
    runs: list[TimedRun] = []
    status = "FINISHED"
    groups = WorkerGroups(base / "ray", name=f"{config.experiment}-table1")  # one start-up for every cell
    try:
        for paradigm, size, cell in cells:
            cell = cell.model_copy(update={"mlflow": cell.mlflow.model_copy(update={"parent_run_id": parent.run_id})})
            if progress:
                print(f"\n== {paradigm}, {size_label(size)} training rows per task ==", flush=True)
            run = run_timed(cell, groups, progress=progress)
            if run.failure is not None:  # one bad run does not sink the table
                log.error("%s at %s rows failed: %s", paradigm, size_label(size), run.failure)
                status = "FAILED"
            # a cell's seconds are its own: the group start-up the first cell waited for is reported apart
            reports[paradigm][size_label(size)] = run.report.model_copy(update={"seconds": run.seconds})
            runs.append(run)
    except BaseException:
        parent.end("KILLED")
        raise
    groups.close()
    largest = streams[sizes[-1]]
    first = next(t.name for t in largest if t.trainable)
    eval_examples = sum(t.eval.num_rows for t in largest)
    pe_config = next((c for p, s, c in cells if p == "prompt_engineering" and s == sizes[-1]), None)
    columns = {p: summarize(p, reports[p], first_task=first, eval_examples=eval_examples,
                            stored_text_bytes=shot_bytes(pe_config, largest) if p == "prompt_engineering" else None)
               for p in paradigms}
    table = {"tasks": largest.names, "model": _model_name(config), "seed": config.seed,
             "train_sizes": [size_label(s) for s in sizes], "paradigms": columns, **startup_summary(groups, runs),
             "mlflow": {"tracking_uri": parent.shown_uri, "parent_run_id": parent.run_id,
                             "experiment_id": parent.experiment_id}}
    json_path, md_path = base / "table1.json", base / "table1.md"
    write_atomic(json_path, json.dumps(table, indent=2))
    write_atomic(md_path, format_table(table))
    for p, entry in columns.items():
        metrics = {f"{p}/trainable_params": entry["trainable_params"], f"{p}/bytes_per_task": entry["bytes_per_task"],
                   f"{p}/forgetting": entry["forgetting"], f"{p}/seconds": entry["seconds"],
                   **{f"{p}/learning_acc/{label}": v for label, v in entry["acc_by_train_size"].items()}}
        parent.log_metrics({k: v for k, v in metrics.items() if v is not None}, step=0)
    for path in (json_path, md_path):
        parent.log_artifact(path)
    parent.end(status)
    return table
