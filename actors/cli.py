"""``forgetless`` command line.

  forgetless run CONFIG [key=value ...]     train the stream, print the matrix, write report.json
  forgetless resume OUTPUT_DIR [CONFIG] [key=value ...]
                                            continue a killed or failed run after its last finished
                                            task; with a CONFIG that adds tasks, extend a finished one
  forgetless compare CONFIG --strategies naive,replay --seeds 3 [--orders 3] [key=value ...]
                                            with resume=true: continue an interrupted comparison
  forgetless table1 CONFIG [key=value ...]  the lecture's Table 1 measured: feature extraction, fine-tuning,
                                            prompt engineering and prompt tuning on the same model and tasks
  forgetless validate CONFIG [key=value ...] check a config (and its data) without training
  forgetless pretrain CONFIG [key=value ...] pretrain our own T5 (span corruption) or BART (text
                                            infilling) on real text; writes a save_pretrained directory
  forgetless submit CONFIG --address URL [key=value ...]
                                            run on a Ray cluster as a job (config and input files packed)
  forgetless status|logs|stop JOB_ID --address URL
  forgetless replay status|add-shards|remove-shards RUN [N] [--address HOST:PORT]
                                            a running run's replay store: where its shards are, resize it
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from pipelines.errors import ConfigError, ForgetlessError
from pipelines.metrics import TASK_FORGETTING
from pipelines.redaction import redact, redacted_keys
from pipelines.report import Restart, RunReport


def format_matrix(report: RunReport) -> str:
    """The accuracy matrix as a text table: rows "after <task>", columns evaluated-on tasks."""
    tasks = report.tasks
    width = max(12, *(len(t) for t in tasks)) + 2
    label_width = max(len("before training"), *(len(f"after {t}") for t in tasks)) + 2
    fmt = lambda v: ("-" if v is None else f"{v:.3f}").rjust(width)  # noqa: E731
    lines = ["".ljust(label_width) + "".join(t.rjust(width) for t in tasks)]
    lines.append("before training".ljust(label_width) + "".join(fmt(v) for v in report.baseline))
    for task, row in zip(tasks[: report.finished_tasks], report.acc_matrix):
        lines.append(f"after {task}".ljust(label_width) + "".join(fmt(v) for v in row))
    if report.recovery:
        lines.append("\nrecovery probe (output head retrained on each earlier task):")
        for task, r in report.recovery.items():
            fmt2 = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
            lines.append(f"  {task}: just after training {fmt2(r['before'])}, after the stream "
                         f"{fmt2(r['after_stream'])}, after the head retrain {fmt2(r['after_head_retrain'])}")
    if report.init is not None:
        lines.append(f"\nstarted from: {report.init.kind} ({report.init.source})")
    def shown(key: str, value: float | None) -> str:
        if value is None:
            return "undefined"
        return f"{value:.3f}" if key.split("/")[0] in ("avg_acc", "learning_acc") else f"{value:+.3f}"

    per_task = {k.removeprefix(TASK_FORGETTING): v for k, v in report.metrics.items() if k.startswith(TASK_FORGETTING)}
    headline = {k: v for k, v in report.metrics.items() if not k.startswith(TASK_FORGETTING)}
    lines.append(f"\n{report.strategy}: " + ", ".join(f"{k} {shown(k, v)}" for k, v in headline.items()))
    if per_task:
        lines.append("forgetting by task: " + ", ".join(f"{k} {shown('forgetting', v)}" for k, v in per_task.items()))
    return "\n".join(lines)


def _train_and_print(config: Any, progress: bool) -> int:
    from actors.launch import RunFailedError, run_experiment

    try:
        report = run_experiment(config, progress=progress)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the run was ended KILLED on the way out
        out = Path(config.output_dir).resolve()
        print(f"\nstopped: the run is marked KILLED; its finished tasks are kept. Continue it with "
              f"`forgetless resume {out}`", file=sys.stderr)
        return 130
    except RunFailedError as exc:
        print(f"\n{redact(str(exc))}", file=sys.stderr)
        if exc.report.finished_tasks:
            print(format_matrix(exc.report), file=sys.stderr)
        return 1
    print()
    print(format_matrix(report))
    for restart in report.restarts:  # what healed on the way (report.json's restarts)
        print(restart_line(restart))
    out = Path(report.output_dir)
    print(f"\nreport:  {out / 'report.json'}\nheatmap: {out / 'acc_heatmap.png'}")
    print_mlflow(report.mlflow.tracking_uri, report.mlflow.experiment_id, report.mlflow.run_id)
    if report.mlflow.pending_records:
        print(f"         {report.mlflow.pending_records} record(s) could not be sent (MLflow unreachable); they are "
              f"in {out / 'mlflow-pending.jsonl'} and go out with `forgetless resume {out}`")
    return 0


def restart_line(restart: Restart) -> str:
    """One restart of a finished run's worker group, as the run's summary prints it."""
    redone = "an unknown number of" if restart.steps_redone is None else str(restart.steps_redone)
    return (f"restart {restart.number}: {'; '.join([*(f'{d} died' for d in restart.died), *restart.reasons])}"
            f" — went on from {restart.restored_from}, {redone} step(s) redone")


def print_mlflow(uri: str, experiment_id: str | None, run_id: str | None, *, what: str = "run") -> None:
    """Where the run is in MLflow, and the UI link that opens it in the model-training view."""
    from actors.tracking import ui_link

    print(f"MLflow:  {what} {run_id} in {uri}")
    if uri.startswith("sqlite:"):
        print(f"         open the UI with: .venv/bin/mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
        address = "http://127.0.0.1:5000"
    elif uri.startswith(("http://", "https://")):
        address = uri
    else:
        return
    if experiment_id is not None:
        print(f"         then: {ui_link(address, experiment_id, run_id)}")


def _run(args: argparse.Namespace) -> int:
    from pipelines.config import load_config

    return _train_and_print(load_config(args.config, args.overrides), not args.no_progress)


def _saved_dict(path: Path) -> dict:
    """A saved run's config as plain data (empty when it is not a mapping: ``load_config`` says why)."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _replay_in_place(data: dict[str, Any], run: Path) -> list[str]:
    """A replay directory the saved config put inside the run's directory, at the same place in
    ``run`` (the run's copy or new home) — as an override, when there is one."""
    store = data["replay"] if isinstance(data.get("replay"), dict) else {}  # the store's block
    old, replay = data.get("output_dir"), store.get("directory")
    if not isinstance(old, str) or not isinstance(replay, str):
        return []
    try:
        return [f"replay.directory={run.resolve() / Path(replay).relative_to(old)}"]
    except ValueError:
        return []  # outside the run: where the user put it


def _resume(args: argparse.Namespace) -> int:
    from pipelines.config import load_config
    from pipelines.rundir import earlier_behaviour

    output_dir = Path(args.output_dir)
    if args.config is not None and "=" in args.config and not Path(args.config).exists():
        args.overrides, args.config = [args.config, *args.overrides], None  # `resume DIR key=value`
    if args.config is None:  # the run's own config, as it was saved
        saved = output_dir / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"{output_dir} holds no run to resume (no config.yaml); start one with `forgetless run`")
        # DIR is the run, wherever it was written: a copied or moved run resumes in place, never
        # in the directory its saved config names
        data = _saved_dict(saved)
        config = load_config(saved, [*earlier_behaviour(data), *_replay_in_place(data, output_dir), *args.overrides,
                                     f"output_dir={output_dir.resolve()}", "resume=true"])
        lost = redacted_keys(config.model_dump(mode="json"))
        if lost:
            raise ConfigError(
                f"{saved}: {', '.join(lost)} had credentials in it, which a run never stores (they show as ***); "
                f"give the value again: `forgetless resume {output_dir} " + " ".join(f"{k}=..." for k in lost)
                + "` (for MLflow: the URI without credentials, and them in MLFLOW_TRACKING_USERNAME and "
                  "MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN)")
    else:
        config = load_config(args.config, [*args.overrides, f"output_dir={output_dir.resolve()}", "resume=true"])
    if not (output_dir / "report.json").is_file():
        raise ConfigError(f"{output_dir} holds no run to resume (no report.json); start one with `forgetless run`")
    return _train_and_print(config, not args.no_progress)


def _compare(args: argparse.Namespace) -> int:
    from actors.compare import compare, parse_strategies, run_dir
    from pipelines.config import load_config
    from pipelines.strategies import STRATEGIES

    strategies = parse_strategies(args.strategies or ",".join(STRATEGIES))
    config = load_config(args.config, args.overrides)
    result = compare(config, strategies, seeds=args.seeds, orders=args.orders, progress=not args.no_progress,
                     tuned=args.tuned)
    out = Path(config.output_dir).resolve()
    for name in strategies:  # each strategy's matrix (first order, first seed), then the table over runs
        report_path = run_dir(out, name, config.seed, 0, args.orders) / "report.json"
        if report_path.is_file():
            print(f"\n== {name} (seed {config.seed}) ==\n{format_matrix(RunReport.read(report_path))}")
    print("\n" + (out / "comparison.md").read_text())
    plots = ", ".join(str(out / name) for name in ("first_task_accuracy.png", "heatmaps.png", "after_each_task.png"))
    print(f"comparison: {out / 'comparison.json'}\nplots:      {plots}")
    print_mlflow(result["mlflow"]["tracking_uri"], result["mlflow"]["experiment_id"], result["mlflow"]["parent_run_id"],
                 what="parent run")
    failed = [r for e in result["strategies"].values() for r in e["runs"] if r["status"] != "FINISHED"]
    return 1 if failed else 0


def _tune(args: argparse.Namespace) -> int:
    from actors.compare import parse_strategies
    from actors.tune import tune
    from pipelines.config import load_config

    strategies = parse_strategies(args.strategies)
    config = load_config(args.config, args.overrides)
    result = tune(config, strategies, trials=args.trials, tasks=args.tasks, validation=args.validation,
                  metric=args.metric, space=args.space, scheduler=args.scheduler, concurrent=args.concurrent,
                  out=args.out, progress=not args.no_progress)
    directory = Path(result["directory"])
    print(f"\ntuned on {', '.join(result['tuned_on']['tasks'])} (validation rows cut from their training splits), "
          f"{args.trials} trial(s) per strategy, ranked by {args.metric}:")
    for name, entry in result["strategies"].items():
        failed = sum(r["status"] != "FINISHED" for r in entry["trials"])
        best = entry["best"]
        shown = "no trial finished" if best is None else (
            ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in best["values"].items())
            + f" -> {args.metric} {best[args.metric]:.3f}")
        print(f"  {name}: {shown}" + (f" ({failed} trial(s) failed)" if failed else ""))
    print(f"tuned values: {directory}/<strategy>.yaml (forgetless compare CONFIG --tuned {directory})")
    print_mlflow(result["mlflow"]["tracking_uri"], result["mlflow"]["experiment_id"], result["mlflow"]["parent_run_id"],
                 what="parent run")
    return 0 if all(entry["best"] is not None for entry in result["strategies"].values()) else 1


def _table1(args: argparse.Namespace) -> int:
    from actors.table1 import table1
    from pipelines.config import load_config

    config = load_config(args.config, args.overrides)
    result = table1(config, progress=not args.no_progress)
    out = Path(config.output_dir).resolve()
    print("\n" + (out / "table1.md").read_text())
    print(f"table:  {out / 'table1.json'}")
    print_mlflow(result["mlflow"]["tracking_uri"], result["mlflow"]["experiment_id"], result["mlflow"]["parent_run_id"],
                 what="parent run")
    failed = [run for entry in result["paradigms"].values() for run in entry["runs"].values()
              if run["status"] != "FINISHED"]
    return 1 if failed else 0


def _pretrain(args: argparse.Namespace) -> int:
    from actors.pretrain import run_pretrain
    from pipelines.config import load_pretrain_config
    from pipelines.pretraining import read_manifest

    directory = run_pretrain(load_pretrain_config(args.config, args.overrides), progress=not args.no_progress)
    manifest = read_manifest(directory) or {}
    heldout = manifest.get("heldout", {})
    print(f"\npretrained {manifest.get('arch')}/{manifest.get('preset')}: {manifest.get('steps')} steps, "
          f"{manifest.get('tokens_seen', 0):,} tokens, {manifest.get('seconds')} s; held-out loss "
          f"{heldout.get('loss', float('nan')):.3f}, masked-token accuracy {heldout.get('masked_token_accuracy', float('nan')):.3f}")
    print(f"checkpoint: {directory}  (model.name_or_path={directory}, or model.pretrain={args.config})")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from pipelines.config import load_config, resolve_paths
    from pipelines.paradigms import check_paradigm
    from pipelines.plan import check_stream
    from pipelines.tasks import load_stream

    config = resolve_paths(load_config(args.config, args.overrides))
    stream = load_stream(config)
    check_stream(config, stream)
    check_paradigm(config, stream)
    print(json.dumps({"tasks": {t.name: {"train": t.train.num_rows, "eval": t.eval.num_rows} for t in stream},
                      "output_dir": config.output_dir, "tracking_uri": redact(config.mlflow.tracking_uri)}, indent=2))
    return 0


def _submit(args: argparse.Namespace) -> int:
    from actors.remote import submit

    job_id, packed, config = submit(args.config, args.overrides, address=args.address)
    print(f"submitted job {job_id} to {redact(args.address)}")
    for key, path in packed:
        print(f"  packed {key}: {path}")
    print(f"  output_dir {config.output_dir}; MLflow {redact(config.mlflow.tracking_uri or '')}")
    print(f"follow it:  forgetless logs {job_id} --address {redact(args.address)} --follow\n"
          f"state:      forgetless status {job_id} --address {redact(args.address)}\n"
          f"replay:     forgetless replay status {config.output_dir} --address <the cluster's GCS address, e.g. HEAD:6379>\n"
          f"stop it:    forgetless stop {job_id} --address {redact(args.address)}")
    return 0


def _supervised_job(args: argparse.Namespace) -> int:
    from actors.remote import supervise

    return supervise(args.config, args.overrides)


def _version(args: argparse.Namespace) -> int:
    from actors.remote import package_version

    if args.imports:  # what a job needs: the three packages and the libraries a run starts with
        import actors.launch  # noqa: F401
        import pipelines.config  # noqa: F401
        import storage.replay  # noqa: F401
    print(f"forgetless {package_version()}")
    return 0


def _job(args: argparse.Namespace) -> int:
    from actors.remote import job_client

    client = job_client(args.address)
    try:
        if args.command == "status":
            info = client.get_job_info(args.job_id)
            print(f"{args.job_id}: {info.status}" + (f" ({info.message})" if info.message else ""))
            return 0
        if args.command == "stop":
            stopped = client.stop_job(args.job_id)
            print(f"{args.job_id}: {'stop requested' if stopped else 'already finished'}")
            return 0
        if not args.follow:
            print(client.get_job_logs(args.job_id), end="")
            return 0
        import asyncio

        async def tail() -> None:
            async for lines in client.tail_job_logs(args.job_id):
                print(lines, end="", flush=True)

        asyncio.run(tail())
        return 0
    except RuntimeError as exc:  # the SDK's "job does not exist" and HTTP errors
        raise ForgetlessError(f"job {args.job_id} at {redact(args.address)}: {redact(str(exc))[:500]}") from None


def _replay(args: argparse.Namespace) -> int:
    from actors.remote import connect, find_run, format_replay_status

    connect(args.address)
    scheduler, description = find_run(args.run)
    if args.action != "status":
        if args.count is None or args.count <= 0:
            raise ConfigError(f"forgetless replay {args.action} RUN N: N, the number of shards, must be a positive "
                              "integer")
        change = args.count if args.action == "add-shards" else -args.count
        result = _ask(scheduler.resize_replay.remote(change))
        print(f"{args.action}: the store has {result['num_shards']} shards; {result['moved_rows']:,} rows moved")
    print(format_replay_status(description, _ask(scheduler.replay_status.remote())))
    return 0


def _ask(ref):
    """A running scheduler's answer; its refusal (a ValueError: no store, too few shards) as a ConfigError."""
    import ray

    try:
        return ray.get(ref)
    except ValueError as exc:
        raise ConfigError(str(exc).strip().splitlines()[-1]) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="forgetless", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, help_text in (("run", _run, "train a task stream and measure forgetting"),
                                  ("compare", _compare, "run several strategies on the same stream and seeds"),
                                  ("table1", _table1, "measure the lecture's Table 1: the four paradigms side by side"),
                                  ("validate", _validate, "check a config and load its data, no training"),
                                  ("pretrain", _pretrain, "pretrain a T5 or BART on real text (denoising)")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("config", help="experiment YAML, e.g. configs/tiny/naive.yaml")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. training.lr=1e-4")
        if name in ("run", "compare", "pretrain", "table1"):
            p.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")
        if name == "compare":
            p.add_argument("--strategies", default=None,
                           help="comma-separated, combinations joined by '+', e.g. naive,replay,replay+lwf,joint "
                                "(default: every strategy)")
            p.add_argument("--seeds", type=int, default=1, help="seeds per strategy: seed, seed+1, ...")
            p.add_argument("--orders", type=int, default=1,
                           help="task orders per strategy: the config's, then stream.orders, then seeded permutations")
            p.add_argument("--tuned", default=None, metavar="DIR",
                           help="each strategy's values from DIR/<strategy>.yaml, written by `forgetless tune`")
        p.set_defaults(func=func)
    p = sub.add_parser("tune", help="choose each strategy's hyperparameters with Ray Tune on the first tasks' "
                                    "validation rows")
    p.add_argument("config", help="experiment YAML, e.g. configs/tiny/compare.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. training.max_steps=20")
    p.add_argument("--strategies", required=True, help="comma-separated, combinations joined by '+'")
    p.add_argument("--trials", type=int, required=True, help="trials per strategy (the same for every strategy)")
    p.add_argument("--tasks", type=int, default=2, help="tune on the stream's first N tasks (default 2)")
    p.add_argument("--validation", type=float, default=0.2,
                   help="the share of each task's training rows held out to score a trial (default 0.2)")
    p.add_argument("--metric", default="avg_acc", help="what ranks the trials: avg_acc (default), learning_acc, "
                                                       "bwt or forgetting (lower is better)")
    p.add_argument("--space", default=None, metavar="FILE",
                   help="YAML {strategy: {knob: {low, high, log}}} replacing the default ranges")
    p.add_argument("--scheduler", default=None, choices=["asha"], help="stop poor trials after their first tasks")
    p.add_argument("--concurrent", type=int, default=1, help="trials at a time (each a run with its own workers)")
    p.add_argument("--out", default=None, help="where the tuned YAMLs go (default: <output_dir>/tuned)")
    p.add_argument("--no-progress", action="store_true", help="no progress lines (for logs)")
    p.set_defaults(func=_tune)
    p = sub.add_parser("resume", help="continue a run after its last finished task, or extend a finished stream")
    p.add_argument("output_dir", help="the output_dir of the run to continue")
    p.add_argument("config", nargs="?", help="a config listing the same finished tasks (plus new ones to extend); "
                                             "default: the run's own config.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. training.lr=1e-4")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")
    p.set_defaults(func=_resume)
    p = sub.add_parser("submit", help="run a config on a Ray cluster as a job (its input files packed with it)")
    p.add_argument("config", help="experiment YAML")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. output_dir=/shared/runs/x")
    p.add_argument("--address", required=True, help="the cluster's dashboard, e.g. http://127.0.0.1:8265")
    p.set_defaults(func=_submit)
    p = sub.add_parser("job", help="what a submitted job runs: the run, resumed when its driver is killed "
                                   "(up to training.max_failures times)")
    p.add_argument("config", help="experiment YAML")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    p.set_defaults(func=_supervised_job)
    p = sub.add_parser("version", help="print the installed version")
    p.add_argument("--imports", action="store_true", help="import the packages a run needs first (a cluster probe)")
    p.set_defaults(func=_version, overrides=[])
    for name, help_text in (("status", "a submitted job's state"), ("logs", "a submitted job's output"),
                            ("stop", "stop a submitted job (its run ends KILLED; resume it later)")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("job_id")
        p.add_argument("--address", required=True, help="the cluster's dashboard, e.g. http://127.0.0.1:8265")
        if name == "logs":
            p.add_argument("--follow", action="store_true", help="keep printing until the job ends")
        p.set_defaults(func=_job, overrides=[])
    p = sub.add_parser("replay", help="a running run's replay store: status, add-shards, remove-shards")
    p.add_argument("action", choices=["status", "add-shards", "remove-shards"])
    p.add_argument("run", help="the run: its output_dir, that directory's name, or its MLflow run id")
    p.add_argument("count", nargs="?", type=int, help="shards to add or remove")
    p.add_argument("--address", default=None, help="the cluster's GCS address (HOST:6379; default: auto)")
    p.set_defaults(func=_replay, overrides=[])
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")
    from actors.signals import install_stop_signal

    install_stop_signal()  # a job stopped with SIGTERM ends its MLflow run KILLED, not RUNNING
    parser = build_parser()
    # key=value overrides may come before or after the options
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    args.overrides = [*args.overrides, *extra]
    try:
        return args.func(args)
    except ForgetlessError as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM outside a run
        print("\nstopped", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 - a bug or a library's error: its traceback, credentials redacted
        import traceback

        print(redact(traceback.format_exc()), file=sys.stderr, end="")
        return 1


def entry() -> None:
    """The ``forgetless`` command: ``main``, then an exit that skips the interpreter's teardown.

    Finalizing the modules a run imports (torch, DeepSpeed, Ray, MLflow) takes seconds and does
    nothing for the run: everything it writes is written and closed by then. The exit is otherwise
    the interpreter's own: threads that are not daemons are waited for, the Ray this process started
    is ended (``actors.cluster.end_local_ray``: its processes stopped together), exit handlers run
    (logging's flush), the standard streams are flushed.
    """
    import atexit
    import threading

    code = main()
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    if "ray" in sys.modules:  # a command that started (or joined) a Ray
        from actors.cluster import end_local_ray

        end_local_ray()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code or 0))


if __name__ == "__main__":
    entry()
