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

from actors.preflight import ModelStart, resolve_start
from actors.sweep import Sweep, command_groups, preparing
from actors.tracking import check_tracking
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
    groups = command_groups(config, "table1")
    with preparing(config, groups) as workers:  # a pretrained start is built (once) in the cells' worker group
        start = resolve_start(config, progress=progress, workers=workers)
        streams = _check_cells(cells, start)
    reports: dict[str, dict[str, RunReport]] = {p: {} for p in paradigms}
    # one worker group start-up for every cell
    with Sweep(config, "table1", tags={"forgetless.table1": ",".join(paradigms)},
               params=flatten(experiment_dict(config)), groups=groups) as sweep:
        for paradigm, size, cell in cells:
            run = sweep.run(cell, f"{paradigm}, {size_label(size)} training rows per task", progress=progress)
            # a cell's seconds are its own: the group start-up the first cell waited for is reported apart
            reports[paradigm][size_label(size)] = run.report.model_copy(update={"seconds": run.seconds})
    largest = streams[sizes[-1]]
    first = next(t.name for t in largest if t.trainable)
    eval_examples = sum(t.eval.num_rows for t in largest)
    pe_config = next((c for p, s, c in cells if p == "prompt_engineering" and s == sizes[-1]), None)
    columns = {p: summarize(p, reports[p], first_task=first, eval_examples=eval_examples,
                            stored_text_bytes=shot_bytes(pe_config, largest) if p == "prompt_engineering" else None)
               for p in paradigms}
    table = {"tasks": largest.names, "model": _model_name(config), "seed": config.seed,
             "train_sizes": [size_label(s) for s in sizes], "paradigms": columns, **sweep.startup_summary(),
             "mlflow": sweep.mlflow_ref()}
    json_path, md_path = base / "table1.json", base / "table1.md"
    write_atomic(json_path, json.dumps(table, indent=2))
    write_atomic(md_path, format_table(table))
    metrics = {}
    for p, entry in columns.items():
        metrics.update({f"{p}/trainable_params": entry["trainable_params"],
                        f"{p}/bytes_per_task": entry["bytes_per_task"], f"{p}/forgetting": entry["forgetting"],
                        f"{p}/seconds": entry["seconds"],
                        **{f"{p}/learning_acc/{label}": v for label, v in entry["acc_by_train_size"].items()}})
    sweep.finish(metrics, artifacts=[json_path, md_path])
    return table
