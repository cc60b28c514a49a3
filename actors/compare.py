"""``forgetless compare``: several strategies on the same stream, seeds and task orders, one comparison.

Every strategy runs under one protocol, recorded in comparison.json: one tokenizer, one replay
memory budget and one replayed-rows rate, the same loss average, each strategy's stated departures
from its paper, and optionally the values ``forgetless tune`` chose for each (``--tuned``). One
MLflow parent run holds a child run per (strategy, order, seed), the aggregated metrics and the
plots; ``<output_dir>/comparison.json`` and ``comparison.md`` hold the table (per strategy, each
metric's mean, sample std and 95% t interval over every run) and every pair's paired differences
with their hierarchical bootstrap intervals and Holm-corrected p-values (``pipelines.significance``).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from actors.preflight import shared_tokenizer
from actors.sweep import Sweep, TimedRun, command_groups, preparing
from actors.tracking import check_tracking
from pipelines.config import STRATEGY_CONFIGS, RunConfig, experiment_dict, flatten, resolve_paths, validate_config
from pipelines.errors import ConfigError
from pipelines.metrics import TASK_FORGETTING, ForgettingMatrix, final_only, gap_to_joint, interval
from pipelines.models import directory_digest
from pipelines.plan import planning_for
from pipelines.plots import plot_comparison, plot_curves
from pipelines.report import RunReport
from pipelines.rundir import OutputDir
from pipelines.significance import HEADLINE, RunCell, pairwise
from pipelines.strategies import check_combination, deviations
from pipelines.sweep_state import (STATE_FILE, RunTiming, SweepState, finished_report, read_state, setup_changes,
                                   setup_record)
from pipelines.tuning import read_tuned, with_values
from storage.files import write_atomic

log = logging.getLogger("forgetless")
METRICS = ("avg_acc", "forgetting", "bwt", "fwt", "learning_acc", "gap_to_joint")
SIGNIFICANCE = ("paired differences A - B over the (order, seed) cells both finished; 95% interval: percentile "
                "hierarchical bootstrap (at least 1,000 replicates, 20 x pairs / 0.05 with more pairs, so that Holm's "
                "correction can still reach significance: each pair records its count; orders, then seeds within an "
                "order, then "
                "each task's eval examples, shared by A and B and by every row); p: two-sided bootstrap, Holm-corrected "
                "over the pairs per metric; significant: corrected p < 0.05 (pipelines/significance.py)")


def _trains_only_at_end(name: str) -> bool:
    """Whether strategy ``name`` (or combination ``a+b``) trains once, at the end, on every task."""
    return planning_for([STRATEGY_CONFIGS[part]() for part in name.split("+")]).trains_only_at_end


def metric_prefix(name: str) -> str:
    """A strategy's name as MLflow takes it in a metric's key (no '+'): replay+lwf -> replay_with_lwf."""
    return name.replace("+", "_with_")


def parse_strategies(text: str) -> list[str]:
    """``--strategies naive,replay,replay+lwf``: strategies, or combinations joined by '+'."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = sorted({part for n in names for part in n.split("+") if part not in STRATEGY_CONFIGS})
    if unknown or not names:
        raise ConfigError(f"--strategies: unknown {unknown or 'empty list'}; choose from {sorted(STRATEGY_CONFIGS)} "
                          "(or combine them with '+': replay+lwf)")
    if len(set(names)) != len(names):
        raise ConfigError(f"--strategies: {names} names a strategy twice")
    for name in names:
        try:
            check_combination(name.split("+"))
        except ValueError as exc:
            raise ConfigError(f"--strategies: {exc}") from None
    return names


def task_orders(config: RunConfig, count: int) -> list[list[str]]:
    """``count`` orders of the config's tasks: the config's own first, then ``stream.orders`` as
    listed, then seeded permutations (the same for every run seed: order k is one order for all
    seeds). The pretraining task, when there is one, stays first: it is not in ``stream.tasks``.

    Raises:
        ConfigError: more orders asked for than the tasks have.
    """
    names = [t.name for t in config.stream.tasks]
    if count < 1:
        raise ConfigError(f"--orders ({count}) must be at least 1")
    possible = math.factorial(len(names))
    if count > possible:
        raise ConfigError(f"--orders {count}: {len(names)} task(s) have only {possible} order(s)")
    orders = [names]
    for listed in config.stream.orders or []:
        if listed not in orders and len(orders) < count:
            orders.append(list(listed))
    k = 0
    while len(orders) < count:
        k += 1
        candidate = [names[i] for i in np.random.default_rng([0x0DE5, k]).permutation(len(names))]
        if candidate not in orders:
            orders.append(candidate)
    return orders


def _untrained(report: RunReport) -> tuple[int, ...]:
    """Tasks this run measured but never trained (the pretraining task)."""
    return tuple(j for j, name in enumerate(report.tasks) if name in report.train and not report.train[name].steps)


def _gap_to_joint(report: RunReport, reference: RunReport | None) -> float | None:
    if reference is None or reference.status != "FINISHED" or reference.tasks != report.tasks:
        return None
    acc, final = (ForgettingMatrix.from_dict(r.model_dump()).acc for r in (report, reference))
    return gap_to_joint(acc, final[-1], skip=_untrained(report))


CURVE = ("avg_acc", "forgetting")  # the metrics plotted against the number of tasks seen


def after_each_task(runs: list[RunReport], *, only_at_end: bool) -> dict[str, list[dict[str, Any]]]:
    """Each of ``CURVE`` after each task: point t is the ``interval`` over the runs of the metric
    after their task t (``metrics_per_task[t]``, each run in its own order), so a curve shows how
    forgetting and average accuracy grow with the number of tasks seen. A strategy that trains only
    at the end has only avg_acc's last point (before it, nothing is trained)."""
    length = max((len(r.metrics_per_task) for r in runs), default=0)
    curve: dict[str, list[dict[str, Any]]] = {}
    for metric in CURVE:
        points = []
        for t in range(length):
            defined = not only_at_end or (metric == "avg_acc" and t == length - 1)
            points.append(interval([r.metrics_per_task[t].get(metric) for r in runs
                                    if defined and t < len(r.metrics_per_task)]))
        curve[metric] = points
    return curve


def aggregate(reports: dict[str, list[RunReport]], timings: dict[str, list[dict[str, float]]] | None = None
              ) -> dict[str, Any]:
    """Per strategy: mean, sample std and 95% interval over (order, seed) runs of each metric
    (and of each per-metric average the runs report), and the mean matrix over the runs in the
    config's own order (other orders put other tasks in each row). The gap to joint needs the joint
    model of the same order and seed: it is there only when joint is compared."""
    out: dict[str, Any] = {}
    # the gap to joint's reference: the strategy that trains once on every task (joint), when compared
    reference = next((name for name in reports if _trains_only_at_end(name)), None)
    joint = {(tuple(r.tasks), r.seed): r for r in reports.get(reference, [])}
    for name, runs in reports.items():
        finished = [r for r in runs if r.status == "FINISHED"]
        only_at_end = _trains_only_at_end(name)
        values: dict[str, list[float | None]] = {}
        for r in finished:
            metrics = {**r.metrics, "gap_to_joint": _gap_to_joint(r, joint.get((tuple(r.tasks), r.seed)))}
            for metric, value in (final_only(metrics) if only_at_end else metrics).items():
                values.setdefault(metric, []).append(value)
        entry: dict[str, Any] = {metric: interval(values.get(metric, [])) for metric in METRICS}
        entry.update({metric: interval(v) for metric, v in sorted(values.items()) if "/" in metric})
        in_order = [r for r in finished if r.tasks == finished[0].tasks] if finished else []
        if in_order:
            entry["acc_matrix_mean"] = np.mean([np.array(r.acc_matrix, dtype=float) for r in in_order],
                                               axis=0).tolist()
            entry["baseline_mean"] = np.mean([np.array(r.baseline, dtype=float) for r in in_order], axis=0).tolist()
        entry["curve"] = after_each_task(finished, only_at_end=only_at_end)
        entry["seeds"] = sorted({r.seed for r in finished})
        timed = (timings or {}).get(name) or [{} for _ in runs]
        entry["runs"] = [{"seed": r.seed, "order": r.tasks, "status": r.status, "run_id": r.mlflow.run_id,
                          "metrics": r.metrics, "seconds": t.get("wall_s", r.seconds) - t.get("startup_s", 0.0),
                          **t, "continued": bool(r.resumes), "error": r.error} for r, t in zip(runs, timed)]
        held = [max(r.replay.rows_after_task.values()) for r in finished if r.replay and r.replay.rows_after_task]
        entry["replay_rows_max"] = max(held) if held else None  # the most rows its store held after any task
        # a run continued after an interruption timed its last attempt only: its wall time is left out
        entry["seconds"] = interval([run["seconds"] for run in entry["runs"]
                                     if run["status"] == "FINISHED" and not run["continued"]])
        if only_at_end:
            entry["note"] = "trained once, on every task at the end: only avg_acc is meaningful"
        out[name] = entry
    return out


def comparison_matrices(tasks: list[str], summary: dict[str, Any]) -> dict[str, ForgettingMatrix]:
    """The mean matrix of each strategy, for the pictures. A strategy that trains only at the end
    (joint) has its earlier rows blanked: they are the untrained model, not forgetting."""
    matrices = {}
    for name, entry in summary.items():
        if "acc_matrix_mean" not in entry:
            continue
        acc = np.array(entry["acc_matrix_mean"], dtype=float)
        if _trains_only_at_end(name):
            acc[:-1] = np.nan
        matrices[name] = ForgettingMatrix(tasks, acc=acc, baseline=np.array(entry["baseline_mean"], dtype=float))
    return matrices


def format_pairs(pairs: list[dict[str, Any]]) -> list[str]:
    """The paired differences as a table: A - B, its 95% interval, the Holm-corrected p; '*' marks a
    significant difference."""
    if not pairs:
        return []
    lines = ["", "Paired differences A - B (same order, seed and eval examples): mean [95% hierarchical bootstrap "
             "interval] p (Holm-corrected over the pairs); * significant at 0.05:", "",
             "| A - B | " + " | ".join(HEADLINE) + " |", "|---" * (len(HEADLINE) + 1) + "|"]
    for pair in pairs:
        cells = []
        for metric in HEADLINE:
            result = pair["metrics"].get(metric)
            if result is None:
                cells.append("n/a")
                continue
            low, high = result["ci95"]
            mark = " *" if result.get("significant") else ""
            cells.append(f"{result['diff']:+.3f} [{low:+.3f}, {high:+.3f}] p={result['p_holm']:.3f}{mark}")
        lines.append(f"| {pair['a']} - {pair['b']} | " + " | ".join(cells) + " |")
    results = [r for pair in pairs for r in pair["metrics"].values() if r is not None]
    if results and max(r["n"] for r in results) == 1:
        lines += ["", "One run per strategy: these intervals cover the eval examples only, not another seed or "
                      "task order (--seeds, --orders)."]
    elif results and max(r["orders"] for r in results) == 1:
        lines += ["", "One task order: these intervals cover the seeds and eval examples, not another order "
                      "(--orders)."]
    return lines


def format_table(tasks: list[str], summary: dict[str, Any], *, seeds: int, orders: int = 1,
                 pairs: list[dict[str, Any]] | None = None) -> str:
    def cell(stat: dict[str, Any], signed: bool) -> str:
        if stat["mean"] is None:
            return "n/a"
        mean = f"{stat['mean']:+.3f}" if signed else f"{stat['mean']:.3f}"
        return f"{mean} ± {stat['ci95']:.3f}" if stat.get("ci95") is not None else mean

    unsigned = ("avg_acc", "learning_acc")
    lines = [f"Stream: {' -> '.join(tasks)}; {orders} task order(s) x {seeds} seed(s); mean ± half-width of a "
             "95% t interval over the runs, pooled (orders and seeds as if independent: the pairs below are the "
             "test); the final row is the first order's.", "",
             "| strategy | " + " | ".join(METRICS) + " | seconds | final row |",
             "|---" * (len(METRICS) + 3) + "|"]
    for name, entry in summary.items():
        final = entry.get("acc_matrix_mean", [[]])[-1]
        row = ", ".join(f"{v:.2f}" for v in final)
        seconds = entry["seconds"]["mean"]
        lines.append(f"| {name} | " + " | ".join(cell(entry[m], m not in unsigned) for m in METRICS)
                     + f" | {'n/a' if seconds is None else f'{seconds:.0f}'} | [{row}] |")
    by_metric = sorted({m for entry in summary.values() for m in entry
                        if "/" in m and not m.startswith(TASK_FORGETTING)})
    if by_metric:
        lines += ["", "Per scoring metric (the tasks mix them):", "",
                  "| strategy | " + " | ".join(by_metric) + " |", "|---" * (len(by_metric) + 1) + "|"]
        for name, entry in summary.items():
            lines.append(f"| {name} | " + " | ".join(cell(entry[m], False) if m in entry else "n/a"
                                                    for m in by_metric) + " |")
    lines += ["", "forgetting = mean over earlier tasks of (best accuracy from the task's own training until before "
              "the last task - accuracy after it);",
              "bwt = mean of acc[T-1, i] - acc[i, i]; fwt = mean of acc[i-1, i] - baseline[i]; "
              "learning_acc = mean of acc[i, i] (each task just after training it); "
              "gap_to_joint = mean of joint's final acc on task i - acc[i, i] (only when joint is compared; not "
              "Chaudhry's intransigence, whose reference for task i is joint on tasks 0..i). "
              "joint: only avg_acc is defined."]
    lines += format_pairs(pairs or [])
    return "\n".join(lines) + "\n"


def read_example_scores(directory: Path, finished: int) -> tuple[dict[str, list[float]], list[dict[str, list[float]]]]:
    """A run's per-example scores (``example_scores/``): the baseline's and each finished row's.
    Only JSON objects of number lists are taken (the directory may be shared: nothing in it runs);
    a file missing or malformed leaves that row without examples, said in the log."""
    def read(name: str) -> dict[str, list[float]]:
        path = directory / "example_scores" / f"{name}.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("%s: no per-example scores (%s); its cells keep their recorded means", path, exc)
            return {}
        if not isinstance(data, dict) or not all(
                isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
                for v in data.values()):
            log.warning("%s: not task -> list of scores; its cells keep their recorded means", path)
            return {}
        return data
    return read("baseline"), [read(f"after-{k:02d}") for k in range(finished)]


def run_cells(reports: dict[str, list[RunReport]], dirs: dict[str, list[Path]],
              order_list: list[list[str]]) -> dict[str, dict[tuple[int, int], RunCell]]:
    """Each strategy's finished runs as the bootstrap reads them, keyed by (order, seed)."""
    cells: dict[str, dict[tuple[int, int], RunCell]] = {}
    for name, runs in reports.items():
        only_at_end = _trains_only_at_end(name)
        cells[name] = {}
        for report, directory in zip(runs, dirs[name]):
            if report.status != "FINISHED":
                continue
            matrix = ForgettingMatrix.from_dict(report.model_dump())
            baseline, rows = read_example_scores(directory, report.finished_tasks)
            streamed = [t for t in report.tasks if t in order_list[0]]  # the pretraining task is in no order
            order = order_list.index(streamed) if streamed in order_list else -1
            cells[name][order, report.seed] = RunCell(order, report.seed, report.tasks, rows, baseline, matrix.acc,
                                                      matrix.baseline, skip=_untrained(report), final_only=only_at_end)
    return cells


def run_dir(base: Path, name: str, seed: int, order: int, orders: int) -> Path:
    """Where one run of a comparison goes: <base>/<strategy>[/order-<k>]/seed-<s>."""
    return base / name / (f"order-{order}" if orders > 1 else "") / f"seed-{seed}"


def check_protocol(config: RunConfig, strategies: list[str]) -> None:
    """Refuse a comparison whose replay-based strategies would not share one memory: each would keep
    and replay rows by its own settings (replay ``rows_per_task`` per task, DER++ two batches of its
    own size), and the comparison would measure the settings, not the strategies.

    Raises:
        ConfigError: naming the strategies and the missing keys.
    """
    replaying = [name for name in strategies
                 if planning_for([STRATEGY_CONFIGS[part]() for part in name.split("+")]).uses_replay]
    missing = [f"replay.{key}" for key in ("memory_rows", "rows_per_batch") if getattr(config.replay, key) is None]
    if replaying and missing:
        raise ConfigError(
            f"compare: {', '.join(replaying)} replay rows, and a fair comparison gives each the same memory and the "
            f"same replayed rows per step: set {' and '.join(missing)} (e.g. replay.memory_rows=1000: the store's "
            "total rows, shared by every task; replay.rows_per_batch=8: rows replayed per micro-batch)")


def protocol(config: RunConfig, strategies: list[str], tokenizer: dict[str, str]) -> dict[str, Any]:
    """What every run of the comparison shares, and how each strategy departs from its paper."""
    training = config.training
    return {
        "tokenizer": tokenizer,
        "replay_memory_rows": config.replay.memory_rows,
        "replay_rows_per_batch": config.replay.rows_per_batch,
        "loss_mean": training.loss_mean,
        "steps_per_task": training.max_steps, "epochs_per_task": None if training.max_steps else training.epochs,
        "micro_batch_size": training.micro_batch_size, "grad_accum_steps": training.grad_accum_steps,
        "num_workers": training.num_workers, "lr": training.lr, "lr_schedule": training.lr_schedule,
        "settings": {name: [getattr(config.strategies, part).model_dump(by_alias=True) for part in name.split("+")]
                     for name in strategies},
        "deviations": {name: {part: text for part, text in deviations(config.with_strategy(name)).items() if text}
                       for name in strategies},
    }


def resumable(base: Path, config: RunConfig, setup: dict[str, Any], planned: list[Path]) -> SweepState | None:
    """The interrupted comparison in ``base`` that ``resume=true`` continues (None: start one).
    ``planned``: the directories of the comparison's runs.

    Raises:
        ConfigError: ``base`` holds a comparison (or runs where this one's go) and neither
            resume=true nor overwrite=true was given; or resume=true with another setup (each change
            named), with its shared tokenizer changed or gone, or with runs but no state to say
            which tokenizer they read.
    """
    if config.overwrite:  # whatever is there, even a broken state
        return None
    previous = read_state(base)
    if previous is None:
        held = [where for where in planned if OutputDir(where).holds_a_run()]
        if held:
            raise ConfigError(f"output_dir {base} holds runs but no {STATE_FILE} (e.g. {held[0]}): a comparison "
                              "written by an older version, or runs of another command. Its runs cannot be continued "
                              "as one comparison; start over with overwrite=true, or choose another output_dir")
        return None
    # every run's report read here: a broken one is refused before anything starts
    done = sum(finished_report(where) is not None for where in planned)
    if not config.resume:
        raise ConfigError(f"output_dir {base} already holds a comparison ({done} run(s) finished). Continue it with "
                          "resume=true (finished runs are kept, an interrupted one continues from its last task), "
                          "start over with overwrite=true, or choose another output_dir")
    changes = setup_changes(previous.setup, setup)
    if changes:
        raise ConfigError(f"resume=true continues the comparison in {base} only as it was started; {len(changes)} "
                          f"change(s): {'; '.join(changes[:20])}{' ...' if len(changes) > 20 else ''}. Undo them, or "
                          "start over with overwrite=true, or choose another output_dir")
    tokenizer = base / "tokenizer"
    digest = directory_digest(tokenizer) if tokenizer.is_dir() else None
    if digest != previous.tokenizer["digest"]:
        raise ConfigError(f"{tokenizer}: the comparison's shared tokenizer is {'changed' if digest else 'gone'} "
                          f"(digest {digest} against {previous.tokenizer['digest']} when it was started); its runs "
                          "cannot be continued with another. Start over with overwrite=true")
    return previous


def with_tokenizer(config: RunConfig, directory: str) -> RunConfig:
    """``config`` with every run loading the tokenizer saved in ``directory``."""
    data = config.model_dump(by_alias=True)
    data["model"]["tokenizer"]["name_or_path"] = directory
    return validate_config(data, origin="compare's shared tokenizer")


def compare(config: RunConfig, strategies: list[str], *, seeds: int, orders: int = 1,
            progress: bool = True, tuned: str | None = None) -> dict[str, Any]:
    """Run every (strategy, order, seed) on the same tasks; returns the comparison written to disk.
    ``tuned``: a directory of ``forgetless tune``'s YAMLs, one per strategy, whose values each
    strategy's runs take (every compared strategy needs one)."""
    if seeds < 1:
        raise ConfigError(f"--seeds ({seeds}) must be at least 1")
    check_protocol(config, strategies)
    chosen = {name: read_tuned(Path(tuned), name, config) for name in strategies} if tuned else {}
    order_list = task_orders(config, orders)
    config = resolve_paths(config)
    check_tracking(config.mlflow.tracking_uri)
    base = Path(config.output_dir)
    setup = setup_record(experiment_dict(config), strategies, seeds, order_list, chosen)
    planned = [run_dir(base, name, config.seed + k, o, orders) for name in strategies
               for o in range(len(order_list)) for k in range(seeds)]
    previous = resumable(base, config, setup, planned)
    groups = command_groups(config, "compare")
    with preparing(config, groups) as workers:  # a pretrained start is built in the runs' worker group
        if previous is not None:  # the interrupted comparison's own, checked by resumable()
            tokenizer = {**previous.tokenizer, "path": str(base / "tokenizer")}
        else:
            tokenizer = shared_tokenizer(config, base / "tokenizer", progress=progress, workers=workers)
        shared = {**protocol(config, strategies, tokenizer), "tuned": chosen or None}
        config = with_tokenizer(config, tokenizer["path"])
        params = {**flatten(experiment_dict(config)), "compare.strategies": ",".join(strategies),
                  "compare.seeds": seeds, "compare.orders": json.dumps(order_list)}
    runs: dict[str, list[TimedRun]] = {name: [] for name in strategies}
    resumption: dict[str, list[str]] = {"kept": [], "continued": []}
    with Sweep(config, "compare", tags={"forgetless.compare": ",".join(strategies)}, params=params, groups=groups,
               parent_run_id=previous.parent_run_id if previous is not None else None) as sweep:
        state = SweepState(setup=setup, tokenizer=tokenizer, parent_run_id=sweep.parent.run_id,
                           runs=previous.runs if previous is not None else {})
        state.write(base)
        for name in strategies:
            for o, order in enumerate(order_list):
                for k in range(seeds):
                    seed, where = config.seed + k, run_dir(base, name, config.seed + k, o, orders)
                    key = where.relative_to(base).as_posix()
                    label = f"{name}, order {o} ({' -> '.join(order)}), seed {seed}"
                    done = finished_report(where) if previous is not None else None
                    if done is not None:
                        timing = state.runs.get(key)  # absent: stopped after the report, before the state
                        runs[name].append(sweep.skip(done, timing.wall_s if timing else done.seconds,
                                                     timing.startup_s if timing else 0.0, label, progress=progress))
                        resumption["kept"].append(key)
                        continue
                    values = {"seed": seed, "order": order, "output_dir": str(where)}
                    run_config = (with_values(config, name, chosen[name]["values"], **values) if name in chosen
                                  else config.with_strategy(name, **values))
                    if previous is not None and OutputDir(where).holds_a_run():
                        if (where / "report.json").is_file():
                            resumption["continued"].append(key)
                        else:  # stopped before its first report: nothing of it to continue
                            run_config = run_config.model_copy(update={"resume": False, "overwrite": True})
                    timed = sweep.run(run_config, label, progress=progress)
                    runs[name].append(timed)
                    if timed.failure is None:
                        state.runs[key] = RunTiming(**timed.timing())
                        state.write(base)
    reports = {name: [r.report for r in timed] for name, timed in runs.items()}
    dirs = {name: [run_dir(base, name, config.seed + k, o, orders) for o in range(len(order_list))
                   for k in range(seeds)] for name in strategies}
    first = next(r for timed in reports.values() for r in timed)
    tasks = first.tasks
    summary = aggregate(reports, {name: [r.timing() for r in timed] for name, timed in runs.items()})
    costs = sweep.startup_summary()
    pairs = pairwise(run_cells(reports, dirs, order_list), seed=config.seed,
                     progress=(lambda what: print(f"bootstrap: {what}", flush=True)) if progress else None)
    comparison = {"tasks": tasks, "seeds": seeds, "orders": order_list, "protocol": shared, "strategies": summary,
                  "pairs": pairs, "significance": SIGNIFICANCE, **costs, "mlflow": sweep.mlflow_ref(),
                  "resumed": resumption if previous is not None else None}
    if progress:
        overhead = costs["per_run_overhead_s"]
        print(f"\n{sum(map(len, runs.values()))} run(s), {costs['worker_group_startups']} worker group start-up(s) "
              f"({', '.join(f'{s:.0f} s' for s in costs['worker_group_startup_s'] if s is not None)}); per run beyond "
              f"training and evaluation: {overhead['mean'] or 0:.1f} s", flush=True)
    json_path = base / "comparison.json"
    write_atomic(json_path, json.dumps(comparison, indent=2))
    md_path = base / "comparison.md"
    write_atomic(md_path, format_table(tasks, summary, seeds=seeds, orders=orders, pairs=pairs))
    plots = [*plot_comparison(comparison_matrices(tasks, summary), base),
             plot_curves({name: entry["curve"] for name, entry in summary.items()}, base / "after_each_task.png")]
    metrics = {f"{metric_prefix(name)}/{m}": entry[m]["mean"] for name, entry in summary.items() for m in METRICS}
    sweep.finish({**metrics, "worker_group_startups": costs["worker_group_startups"],
                  "per_run_overhead_s": costs["per_run_overhead_s"]["mean"]}, artifacts=[json_path, md_path, *plots])
    return comparison
