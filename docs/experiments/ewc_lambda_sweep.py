"""EWC's lambda, chosen without looking at the stream it is reported on.

The sweep never sees a later task, nor the first task's eval split: it splits the *training* rows
of the stream's first task by label into two halves (labels sorted, alternating), and runs the
two halves as a two-task stream — each half cut into train and validation by the usual split —
once per lambda. The lambda with the best final average validation accuracy over the two halves
wins (ties: the smaller). Writes ``<out>/sweep.json`` and prints the table.

  .venv/bin/python docs/experiments/ewc_lambda_sweep.py configs/domain_incremental.yaml \\
      --lambdas 0,1,10,100,1000,10000 --out runs/results/ewc-sweep [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

from pipelines.config import load_config
from pipelines.tasks import load_stream


def halves(config_path: str, overrides: list[str], out: Path) -> tuple[dict, list[dict]]:
    """The first task's training rows, split by label into two file tasks under ``out``."""
    config = load_config(config_path, overrides)
    stream = load_stream(config)
    first = next(t for t in stream if t.trainable)
    sources = first.train.column("source").to_pylist()
    targets = first.train.column("target").to_pylist()
    labels = sorted(set(targets))
    if len(labels) < 2 or len(labels) > 100:
        sys.exit(f"the first task ({first.name!r}) has {len(labels)} distinct targets: the sweep splits a "
                 "classification task by label (2 to 100 labels)")
    tasks = []
    for half, chosen in (("a", labels[0::2]), ("b", labels[1::2])):
        path = out / f"{first.name}-{half}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for s, t in zip(sources, targets):
                if t in chosen:
                    f.write(json.dumps({"source": s, "target": t}) + "\n")
        cap = next(t for t in config.stream.tasks if t.name == first.name).max_eval_examples
        tasks.append({"name": f"{first.name}_{half}", "prefix": first.prefix, "metric": first.metric,
                      "max_eval_examples": cap, "source": {"kind": "file", "path": str(path.resolve())}})
    return config.model_dump(by_alias=True), tasks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--lambdas", default="0,1,10,100,1000,10000")
    parser.add_argument("--out", type=Path, default=Path("runs/results/ewc-sweep"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    base, tasks = halves(args.config, args.overrides, args.out)
    base["stream"]["tasks"] = tasks
    base["stream"]["pretraining_task"] = None
    base["recovery"]["enabled"] = False
    sweep_config = args.out / "sweep.yaml"
    sweep_config.write_text(yaml.safe_dump({k: v for k, v in base.items() if k not in ("resume", "overwrite")}))
    forgetless = Path(sys.executable).with_name("forgetless")
    rows = []
    for value in [float(v) for v in args.lambdas.split(",")]:
        run_dir = args.out / f"lambda-{value:g}"
        subprocess.run([str(forgetless), "run", str(sweep_config), "strategy.name=ewc", f"strategy.lambda={value}",
                        f"output_dir={run_dir}", "overwrite=true", "--no-progress"], check=True)
        report = json.loads((run_dir / "report.json").read_text())
        rows.append({"lambda": value, "avg_acc": report["metrics"]["avg_acc"],
                     "forgetting": report["metrics"]["forgetting"], "learning_acc": report["metrics"]["learning_acc"],
                     "acc_matrix": report["acc_matrix"], "seconds": report["seconds"]})
    best = max(rows, key=lambda r: (r["avg_acc"], -r["lambda"]))
    (args.out / "sweep.json").write_text(json.dumps({"config": args.config, "overrides": args.overrides,
                                                     "tasks": [t["name"] for t in tasks], "runs": rows,
                                                     "chosen": best["lambda"]}, indent=2))
    print("| lambda | avg_acc | forgetting | learning_acc |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['lambda']:g} | {r['avg_acc']:.3f} | {r['forgetting']:.3f} | {r['learning_acc']:.3f} |")
    print(f"chosen: lambda = {best['lambda']:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
