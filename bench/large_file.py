"""What a task capped at ``max_train_examples`` costs on a file far larger than it: ``forgetless
validate`` over a JSONL file of ``--gb`` GB with ``max_train_examples: 1000``, each trial a fresh
process, its wall time and peak resident memory measured. The file is read line by line up to the
rows the task uses (pipelines.tasks.rows_to_read), so neither figure may grow with the file.

  wall_s        the validate command's wall time, interpreter start-up included (median, every trial)
  peak_rss_mb   its peak resident memory (median, every trial)
  file_gb       the file's size

  python bench/large_file.py --json runs/bench/large_file.json [--gb 2] [--trials 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from common import add_baseline_options, baseline_report, report, spread

REPO = Path(__file__).resolve().parents[1]
# Runs the command in this process and says how much memory it took at its peak.
MEASURED = ("import resource, sys\nfrom actors.cli import main\ncode = main(sys.argv[1:])\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\nsys.exit(code)\n")


def write_big_jsonl(path: Path, gigabytes: float) -> int:
    """Distinct sources, two labels, in ~1 MB blocks until the file has ``gigabytes`` GB."""
    lines, block_no, written = 0, 0, 0
    with path.open("w", encoding="utf-8") as out:
        while written < gigabytes * 2**30:
            block = "".join(json.dumps({"source": f"example {block_no}-{i} " + "word " * 30, "target": "ab"[i % 2]}) + "\n"
                            for i in range(5000))
            out.write(block)
            written += len(block)
            lines += 5000
            block_no += 1
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--gb", type=float, default=2.0)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--max-train-examples", type=int, default=1000)
    add_baseline_options(parser)
    args = parser.parse_args()
    if args.baseline:  # the same command on this code and on REF's, side by side
        return baseline_report(__file__, args)
    with tempfile.TemporaryDirectory(prefix="large-file-") as tmp:
        work = Path(tmp)
        data = work / "big.jsonl"
        started = time.perf_counter()
        lines = write_big_jsonl(data, args.gb)
        print(f"wrote {data.stat().st_size / 2**30:.2f} GB ({lines:,} lines) in {time.perf_counter() - started:.0f} s",
              file=sys.stderr, flush=True)
        config = work / "big.yaml"
        config.write_text(yaml.safe_dump({
            "experiment": "large-file", "output_dir": str(work / "out"),
            "mlflow": {"tracking_uri": f"sqlite:///{work / 'mlflow.db'}"},
            "stream": {"cache_dir": str(work / "cache"), "tasks": [
                {"name": "big", "source": {"kind": "file", "path": str(data)},
                 "max_train_examples": args.max_train_examples}]}}))
        walls, peaks, printed = [], [], None
        for trial in range(args.trials):
            began = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", MEASURED, "validate", str(config)], cwd=REPO,
                                  capture_output=True, text=True)
            walls.append(time.perf_counter() - began)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            peaks.append(int(done.stderr.strip().splitlines()[-1]) / 1024)  # ru_maxrss is in KiB on Linux
            printed = json.loads(done.stdout)
            print(f"trial {trial + 1}: {walls[-1]:.2f} s, {peaks[-1]:.0f} MB", file=sys.stderr, flush=True)
        return report({
            "file_gb": round(data.stat().st_size / 2**30, 2), "lines": lines,
            "max_train_examples": args.max_train_examples, "tasks": printed["tasks"],
            "wall_s": spread(walls), "peak_rss_mb": spread(peaks, None),
        }, args.json)


if __name__ == "__main__":
    sys.exit(main())
