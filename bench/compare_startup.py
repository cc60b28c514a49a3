"""What the runs of a comparison cost beyond their training and evaluation: every run handed to one
Ray Train worker group (what `forgetless compare` does) against a worker group started for each run,
side by side in one process and one local Ray (started before either, so neither pays for it).

  shared_vs_own_wall_ratio   wall time of all runs in one group / the same runs in a group each
  startups                   worker-group start-ups each way (1 against one per run)
  per_run_overhead_s         each run's time beyond training and evaluation (start-up apart)

  python bench/compare_startup.py --json runs/bench/compare_startup.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from common import add_baseline_options, baseline_report, quiet_environment, report, spread  # noqa: E402

quiet_environment()

from actors.sweep import run_timed  # noqa: E402
from actors.cluster import connect_ray  # noqa: E402
from actors.trainer_group import WorkerGroups  # noqa: E402
from pipelines.config import load_config, resolve_paths  # noqa: E402
from pipelines.learner import silence_library_noise  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny" / "compare.yaml"


def _runs(base, strategies: list[str], seeds: int, work: Path, mode: str):
    for name in strategies:
        for seed in range(seeds):
            yield base.with_strategy(name, seed=seed, output_dir=str(work / mode / name / f"seed-{seed}"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--strategies", default="naive,replay,lwf,ewc")
    parser.add_argument("--seeds", type=int, default=2)
    add_baseline_options(parser)
    args = parser.parse_args()
    if args.baseline:  # the same command on this code and on REF's, side by side
        return baseline_report(__file__, args)
    silence_library_noise()
    strategies = args.strategies.split(",")
    work = Path(tempfile.mkdtemp(prefix="compare-startup-"))
    base = resolve_paths(load_config(CONFIG, [f"output_dir={work}", f"mlflow.tracking_uri=sqlite:///{work}/mlflow.db"]))
    connect_ray(base)

    results: dict[str, dict[str, object]] = {}
    for mode in ("own", "shared"):  # own first: the shared group gets no head start from a warm cache
        began, walls, overheads, startups = time.perf_counter(), [], [], 0
        shared = WorkerGroups(work / mode / "ray", name="shared") if mode == "shared" else None
        for config in _runs(base, strategies, args.seeds, work, mode):
            groups = shared or WorkerGroups(Path(config.output_dir) / "ray", name="own")
            started = time.perf_counter()
            run = run_timed(config, groups, progress=False)
            if shared is None:
                groups.close()  # what a run with its own group waits for before the next starts
                startups += len(groups.started)
            if run.failure is not None:
                print(f"{mode}: {config.strategy.name} seed {config.seed} failed: {run.failure}", file=sys.stderr)
                return 1
            walls.append(time.perf_counter() - started)
            overheads.append(run.overhead_s)
        if shared is not None:
            shared.close()
            startups = len(shared.started)
        total = time.perf_counter() - began
        results[mode] = {"wall_s": round(total, 1), "startups": startups, "run_wall_s": spread(walls),
                         "per_run_overhead_s": spread(overheads)}
        print(f"{mode}: {len(walls)} runs in {total:.0f} s, {startups} start-up(s)", file=sys.stderr, flush=True)

    return report({
        "config": str(CONFIG.relative_to(REPO)), "strategies": strategies, "seeds": args.seeds,
        "runs": len(strategies) * args.seeds, **results,
        "shared_vs_own_wall_ratio": round(results["shared"]["wall_s"] / results["own"]["wall_s"], 3),
        "saved_per_run_s": round((results["own"]["wall_s"] - results["shared"]["wall_s"])
                                 / (len(strategies) * args.seeds), 1),
    }, args.json)


if __name__ == "__main__":
    sys.exit(main())
