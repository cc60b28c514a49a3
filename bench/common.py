"""What every benchmark script shares: a quiet environment and one way to report results."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def quiet_environment() -> None:
    """Set before torch/DeepSpeed/Ray are imported: no deprecation floods, CPU DeepSpeed, a local Ray behind a token."""
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # the benchmark's own Ray: on loopback only (Ray's single-machine mode), behind a token of its own
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))


def spread(values: list[float], digits: int | None = 2) -> dict[str, Any]:
    """The median and every trial, rounded to ``digits`` (None: whole numbers): what a bench reports."""
    import statistics

    return {"median": round(statistics.median(values), digits), "trials": [round(v, digits) for v in values]}


def report(results: dict[str, Any], path: Path | None) -> int:
    """Print the results as JSON, and write them to ``path`` when given. Returns the exit code."""
    text = json.dumps(results, indent=2)
    print(text)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return 0


# ---------------------------------------------------------------------- side by side with older code
def add_baseline_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--baseline", metavar="REF", help="measure this checkout's code and git ref REF's in the "
                        "same run, alternating, and print each figure's ratio (this / REF)")
    parser.add_argument("--rounds", type=int, default=3, help="with --baseline: runs of each side (default 3)")


@contextlib.contextmanager
def worktree(ref: str) -> Iterator[Path]:
    """A checkout of git ref ``ref`` in a temporary directory, removed after."""
    work = Path(tempfile.mkdtemp(prefix="forgetless-baseline-"))
    tree = work / "tree"
    made = subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), ref],
                          capture_output=True, text=True)
    if made.returncode != 0:
        shutil.rmtree(work, ignore_errors=True)
        raise SystemExit(f"--baseline {ref}: cannot check it out: {made.stderr.strip()}")
    try:
        yield tree
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


def side_by_side(script: str, argv: list[str], ref: str, rounds: int) -> dict[str, list[dict[str, Any]]]:
    """Run the bench ``script`` with ``argv`` ``rounds`` times on this checkout's code and as many on
    ``ref``'s, alternating (this, ref, this, ref, ...), each a fresh process of this interpreter and
    environment. The bench's own harness (this checkout's) measures both; only the library it
    imports (``storage``, ``pipelines``, ``actors``) is one side's or the other's, by ``PYTHONPATH``.
    Returns each side's results, in order."""
    runs: dict[str, list[dict[str, Any]]] = {"this": [], ref: []}
    with worktree(ref) as tree, tempfile.TemporaryDirectory(prefix="forgetless-side-by-side-") as out:
        for number in range(rounds):
            for side, root in (("this", REPO), (ref, tree)):
                path = Path(out) / f"{len(runs[side])}-{side.replace('/', '_')}.json"
                env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH"))
                                                                   if p)}
                print(f"round {number + 1}/{rounds}: {side}", file=sys.stderr, flush=True)
                # in the side's tree too: Ray's workers put the driver's working directory first on their path
                done = subprocess.run([sys.executable, str(Path(script).resolve()), *argv, "--json", str(path)],
                                      env=env, cwd=root, stdout=subprocess.DEVNULL)
                if done.returncode != 0:
                    raise SystemExit(f"{script} on {side}'s code failed (exit {done.returncode}), round {number + 1}")
                runs[side].append(json.loads(path.read_text()))
    return runs


# Options of a bench that are not handed on to its runs under --baseline: the comparison's own, and
# the files each run would write over (each side's run writes its JSON where side_by_side says).
_NOT_FORWARDED = ("--baseline", "--rounds", "--json", "--plot")


def forwarded_argv(argv: list[str]) -> list[str]:
    """``argv`` (a bench's command line) without ``_NOT_FORWARDED`` and their values."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _NOT_FORWARDED:
            skip = True
        elif not arg.startswith(tuple(f"{option}=" for option in _NOT_FORWARDED)):
            kept.append(arg)
    return kept


def numeric_leaves(value: Any, prefix: str = "") -> dict[str, float]:
    """Every number in a bench's results, by its dotted path (lists of trials and flags left out)."""
    if isinstance(value, dict):
        out: dict[str, float] = {}
        for key, item in value.items():
            out.update(numeric_leaves(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {prefix: float(value)}
    return {}


def leaf_ratios(runs: dict[str, list[dict[str, Any]]], keys: list[str] | None = None) -> dict[str, Any]:
    """For each figure: each side's median and trials, and this side's median over the other's (None
    where the other's median is 0). The figures: ``keys`` (dotted paths), else every number both
    sides report in every run except those no run changes (a setting echoed back, a count of rows)."""
    this, ref = list(runs)
    leaves = {side: [numeric_leaves(r) for r in results] for side, results in runs.items()}
    shared = set.intersection(*(set(leaf) for side in leaves.values() for leaf in side))
    table = {}
    for key in keys if keys is not None else sorted(shared):
        mine, theirs = [r[key] for r in leaves[this]], [r[key] for r in leaves[ref]]
        if keys is None and len(set(mine + theirs)) == 1:
            continue
        median = statistics.median(theirs)
        table[key] = {this: spread(mine, 3), ref: spread(theirs, 3),
                      "ratio": round(statistics.median(mine) / median, 3) if median else None}
    return table


def baseline_report(script: str, args: argparse.Namespace, keys: list[str] | None = None) -> int:
    """What ``--baseline REF`` does in any bench: the bench's own command line (less the comparison's
    options and output files) run ``--rounds`` times on this checkout's code and on REF's,
    alternating (``side_by_side``), and the ratio of each figure (``keys``, else every figure that
    differs: ``leaf_ratios``), printed and reported. A ref whose code the bench cannot drive fails
    naming the side."""
    argv = forwarded_argv(sys.argv[1:])
    runs = side_by_side(script, argv, args.baseline, args.rounds)
    table = leaf_ratios(runs, keys)
    for key, row in table.items():
        print(f"{key}: ratio {row['ratio']} (this {row['this']['median']}, {args.baseline} "
              f"{row[args.baseline]['median']})", file=sys.stderr)
    return report({"bench": Path(script).name, "argv": argv, "rounds": args.rounds, "baseline": args.baseline,
                   "side_by_side": table}, args.json)


class PeakMemory:
    """Every 0.2 s, in a thread: the resident memory of each process whose command line holds
    ``title`` (Ray sets an actor's process title to ``ray::Class`` or ``ray::Class.method``), and of
    all of them together; ``stop()`` gives the peaks in GiB. ``timeline``: every sample is kept too,
    as ``(time.time(), {pid: bytes})`` in ``samples``."""

    def __init__(self, title: str = "RayTrainWorker", *, timeline: bool = False) -> None:
        import threading

        self.title = title
        self.per_pid: dict[int, int] = {}
        self.total = 0
        self.samples: list[tuple[float, dict[int, int]]] | None = [] if timeline else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        import psutil

        while not self._stop.wait(0.2):
            now, seen = time.time(), {}
            for proc in psutil.process_iter(["cmdline"]):
                try:
                    if self.title not in " ".join(proc.info["cmdline"] or []):
                        continue
                    seen[proc.pid] = proc.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            for pid, rss in seen.items():
                self.per_pid[pid] = max(self.per_pid.get(pid, 0), rss)
            self.total = max(self.total, sum(seen.values()))
            if self.samples is not None and seen:
                self.samples.append((now, seen))

    def stop(self) -> dict[str, Any]:
        """The peaks: of the largest process (``worker_peak_gib``), how many were seen, of their sum."""
        self._stop.set()
        self._thread.join()
        return {"worker_peak_gib": round(max(self.per_pid.values(), default=0) / 2**30, 2),
                "workers_seen": len(self.per_pid), "sum_peak_gib": round(self.total / 2**30, 2)}


def small_learners(config: Path, steps: int, names: list[str], work: Path) -> tuple[Any, Any, dict[str, Any]]:
    """The learners of an in-process bench: ``config`` with the small T5 (2k vocabulary) and
    ``steps`` a task, its stream loaded, one tokenizer trained for it (saved under ``work``), and a
    ``Learner`` of each strategy in ``names``. Returns the config, the stream and the learners."""
    from pipelines.config import load_config, resolve_paths
    from pipelines.learner import Learner
    from pipelines.models import stream_tokenizer
    from pipelines.tasks import load_stream

    base = resolve_paths(load_config(config, ["model.preset=small", "model.tokenizer.vocab_size=2000",
                                              f"training.max_steps={steps}", f"output_dir={work}"]))
    stream = load_stream(base)
    tokdir = work / "tokenizer"
    stream_tokenizer(base.model, stream).save_pretrained(tokdir)
    return base, stream, {name: Learner(base.with_strategy(name), tokdir) for name in names}
