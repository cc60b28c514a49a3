#!/usr/bin/env bash
# The runs behind docs/results.md's headline tables: both built-in streams from the MiniLM warm start,
# every strategy tuned with the same budget, 3 seeds x 3 task orders, and a six-task stream.
# 2 CPU cores; outputs under runs/results/. Each block is independent and continues where it stopped
# when run again (`compare ... resume=true`; a tuning whose YAMLs are all written is not run again):
#   docs/experiments/results_that_stand.sh probe STREAM      # one run per strategy, a few steps: the step times
#   docs/experiments/results_that_stand.sh tune STREAM       # forgetless tune on the first two tasks
#   docs/experiments/results_that_stand.sh compare STREAM    # every strategy, 3 seeds x 3 orders, --tuned
#   docs/experiments/results_that_stand.sh six               # the six classification sets, 3 seeds x 1 order
#   docs/experiments/results_that_stand.sh start STREAM      # naive from random init at the same budget
#   docs/experiments/results_that_stand.sh rate STREAM       # naive at replay's tuned learning rate, 3 x 3
#   docs/experiments/results_that_stand.sh tiny              # the machinery: every strategy on the tiny stream, 3 x 3
#   docs/experiments/results_that_stand.sh publish           # the JSONs and pictures docs/results.md reads, its tables
#   docs/experiments/results_that_stand.sh all               # restore, then each block from where it stopped
#   docs/experiments/results_that_stand.sh save              # every block's finished runs, into $CARRIED
#   docs/experiments/results_that_stand.sh restore           # ... and back on another machine, to continue there
# STREAM: task_incremental or domain_incremental.
# The blocks take ~13 h of the 2 cores in all: `save` packs what they have finished (every finished run's
# report and per-example scores; each comparison's state, shared tokenizer and, once through, comparison;
# the MLflow store of their parent runs; no model, no unfinished run) into one archive to commit, and
# `restore` unpacks it into a new checkout at the same path, never over anything there, so that
# `compare ... resume=true` continues on another machine. The archive goes once every block is published.
set -euo pipefail
cd "$(dirname "$0")/../.."
F=.venv/bin/forgetless
OUT=runs/results
TUNED=naive,lwf,ewc,replay,derpp,agem,replay+lwf  # joint and cumulative take naive's learning rate
ALL=$TUNED,joint,cumulative
CARRIED=docs/experiments/unfinished.tar.xz
TRIALS=5
VALIDATION=0.05  # of each tuning task's training rows
# Every strategy's learning rates, narrower than tune's default 1e-4 to 1e-2: a first tuning of the task
# stream (naive and LwF, 10 trials, validation rows only) answered every validation row with one label at
# each rate above 1.5e-3, so the top two of five slices would have been spent on collapse.
LR_LOW=5e-5
LR_HIGH=3e-3

# Each finished run keeps its report, matrix and per-example scores, not its ~0.7 GB of models and
# training state: the 200-odd runs below would not fit on the disk otherwise.
KEEP=checkpoint.after_stream=report

# The budget every run of a stream shares, fixed before any run from the probe's step times (the
# cuts are listed in docs/results.md): steps a task, eval rows a task, likelihood scoring for the
# classification tasks (pronunciation, scored by ROUGE-L, generates).
budget() {
  case $1 in
    task_incremental)  # ~4.1 h for the comparison (the probe: 455 s + 39 s a step a task per order and seed)
      echo training.max_steps=30 training.warmup_steps=3 evaluation.scoring=likelihood \
           strategies.ewc.fisher_examples=64 stream.tasks.0.max_eval_examples=200 \
           stream.tasks.1.max_eval_examples=200 stream.tasks.2.max_eval_examples=100 ;;
    domain_incremental)  # ~4.3 h (four tasks: ~690 s + 52 s a step a task)
      echo training.max_steps=20 training.warmup_steps=2 evaluation.scoring=likelihood \
           strategies.ewc.fisher_examples=64 stream.tasks.0.max_eval_examples=150 \
           stream.tasks.1.max_eval_examples=150 stream.tasks.2.max_eval_examples=150 \
           stream.tasks.3.max_eval_examples=150 ;;
    six_tasks)  # configs/six_tasks.yaml holds the task-incremental budget (~1.6 h for its 15 runs)
      echo strategies.ewc.fisher_examples=64 ;;
    *) echo "unknown stream $1" >&2; exit 2 ;;
  esac
}

probe() {  # each strategy once, 10 steps a task: what a step, an evaluation and a run cost
  local stream=$1
  # shellcheck disable=SC2046
  $F compare configs/$stream.yaml --strategies $ALL --seeds 1 $(budget "$stream") training.max_steps=10 \
     $KEEP output_dir=$OUT/$stream-probe resume=true --no-progress
}

tune() {  # the same trials for every strategy, on the first two tasks' training rows only; one strategy
          # at a time, so that an interrupted tuning loses only the strategy under way
  local stream=$1
  local dir=$OUT/$stream-tune
  mkdir -p "$dir/tuned"
  local published=docs/experiments/results/$stream-tuning.json
  if [ -f "$published" ] && [ ! -f "$dir/tuning.json" ]; then  # the tuning docs/results.md reports: its chosen
    # values written as tune writes them, not tuned again (the same trials would not end on the same scores)
    .venv/bin/python - "$published" "$dir/tuned" <<'EOF'
import json
import sys
from pathlib import Path

from pipelines.tuning import write_tuned

published, directory = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8")), Path(sys.argv[2])
for name, entry in published["strategies"].items():
    finished = [t for t in entry["trials"] if t["status"] == "FINISHED"
                and t["tasks_reported"] == len(published["tuned_on"]["tasks"])]
    write_tuned(directory / f"{name}.yaml", name, entry["best"]["values"], record={
        **published["tuned_on"], "metric": published["metric"], "score": entry["best"][published["metric"]],
        "trials": published["trials"], "finished_trials": len(finished), "search": published["search"],
        "scheduler": "none", "from": sys.argv[1]})
    print(f"{directory / name}.yaml: {entry['best']['values']} (from {sys.argv[1]})")
EOF
    cp "$published" "$dir/tuning.json"
  fi
  for s in ${TUNED//,/ }; do  # each strategy's trials and tuning.json in $dir/<strategy>, its YAML copied to tuned/
    if [ ! -f "$dir/tuned/$s.yaml" ]; then
      rm -rf "${dir:?}/$s"  # an interrupted strategy's trials: that strategy starts over
      printf '%s:\n  lr: {low: %s, high: %s, log: true}\n' "$s" $LR_LOW $LR_HIGH > "$dir/space-$s.yaml"
      # shellcheck disable=SC2046
      $F tune configs/$stream.yaml --strategies "$s" --trials $TRIALS --validation $VALIDATION --out "$dir/$s" \
         --space "$dir/space-$s.yaml" $(budget "$stream") output_dir="$dir/$s" --no-progress
      cp "$dir/$s/$s.yaml" "$dir/tuned/$s.yaml"
    fi
  done
  for s in joint cumulative; do  # no knob of their own: naive's learning rate
    borrowed_rate "$dir/tuned" naive "$dir/tuned" "$s" "naive's tuned learning rate: no knob of its own"
  done
  # every strategy's tuning.json in one, the trials' local paths dropped: what docs/results.md's tuning table reads
  [ -f "$dir/tuning.json" ] || .venv/bin/python - "$dir" "$TUNED" <<'EOF'
import json
import sys
from pathlib import Path

directory, names = Path(sys.argv[1]), sys.argv[2].split(",")
merged = {}
for name in names:
    part = json.loads((directory / name / "tuning.json").read_text(encoding="utf-8"))
    for trial in part["strategies"][name]["trials"]:
        trial.pop("path", None)
    merged = merged or {k: v for k, v in part.items() if k not in ("strategies", "mlflow")} | {"strategies": {}}
    merged["strategies"][name] = part["strategies"][name]
(directory / "tuning.json").write_text(json.dumps(merged, indent=1) + "\n", encoding="utf-8")
EOF
}

borrowed_rate() {  # FROM_DIR SOURCE TO_DIR STRATEGY WHY: TO_DIR/STRATEGY.yaml, a tuned file as tune writes it,
                  # holding SOURCE's tuned learning rate from FROM_DIR and, as its record, WHY and SOURCE's record
  .venv/bin/python - "$@" <<'EOF'
import sys
from pathlib import Path

import yaml

source_dir, source, directory, strategy, why = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4], sys.argv[5]
chosen = yaml.safe_load((source_dir / f"{source}.yaml").read_text())
record = {"from": why, source: chosen["tuned"]}
text = yaml.safe_dump({"strategy": strategy, "values": {"lr": chosen["values"]["lr"]}, "tuned": record}, sort_keys=False)
(directory / f"{strategy}.yaml").write_text(f"# {strategy}: {source}'s tuned learning rate\n" + text)
EOF
}

compare() {  # every strategy, 3 seeds x 3 orders, the tuned values
  local stream=$1
  # shellcheck disable=SC2046
  $F compare configs/$stream.yaml --strategies $ALL --seeds 3 --orders 3 --tuned $OUT/$stream-tune/tuned \
     $(budget "$stream") $KEEP output_dir=$OUT/$stream-compare resume=true --no-progress
}

six() {  # the six classification sets, 3 seeds x 1 order; their first two tasks are the task-incremental
        # stream's, so its tuned values apply (the same steps a task and warm-up)
  mkdir -p $OUT/six_tasks-tuned
  for s in naive replay lwf derpp joint; do cp -n $OUT/task_incremental-tune/tuned/$s.yaml $OUT/six_tasks-tuned/; done
  # shellcheck disable=SC2046
  $F compare configs/six_tasks.yaml --strategies naive,replay,lwf,derpp,joint --seeds 3 --tuned $OUT/six_tasks-tuned \
     $(budget six_tasks) $KEEP output_dir=$OUT/six_tasks-compare resume=true --no-progress
}

start() {  # the warm start's architecture and tokenizer from random init, naive at its tuned learning rate and
          # the stream's budget, 3 seeds x the config's order: set beside the comparison's naive runs of that order
  local stream=$1
  mkdir -p $OUT/$stream-random-tuned
  cp -n $OUT/$stream-tune/tuned/naive.yaml $OUT/$stream-random-tuned/
  # shellcheck disable=SC2046
  $F compare configs/$stream.yaml --strategies naive --seeds 3 --tuned $OUT/$stream-random-tuned \
     $(budget "$stream") model.weights=random $KEEP output_dir=$OUT/$stream-random resume=true --no-progress
}

rate() {  # naive at replay's tuned learning rate, every order and seed of the comparison: how much of replay's
         # gap to naive is its rate (docs/experiments/paired_gap.py rate STREAM sets the three side by side)
  local stream=$1
  mkdir -p $OUT/$stream-rate-tuned
  borrowed_rate "$OUT/$stream-tune/tuned" replay "$OUT/$stream-rate-tuned" naive \
     "replay's tuned learning rate, for naive: a control, not a tuning"
  # shellcheck disable=SC2046
  $F compare configs/$stream.yaml --strategies naive --seeds 3 --orders 3 --tuned $OUT/$stream-rate-tuned \
     $(budget "$stream") $KEEP output_dir=$OUT/$stream-rate resume=true --no-progress
}

tiny() {  # the machinery on the tiny stream (the tiny T5, 203k parameters, from random init): every strategy,
          # 3 seeds x 3 orders, the config's untuned settings; it checks the protocol, not the strategies' merit
  $F compare configs/tiny/compare.yaml --strategies $ALL --seeds 3 --orders 3 $KEEP output_dir=$OUT/tiny-compare \
     resume=true --no-progress
}

publish() {  # what docs/results.md reads, copied from the finished runs (the repository's path made relative)
  .venv/bin/python - "$OUT" <<'EOF'
import shutil
import sys
from pathlib import Path

out, results, pictures_dir = Path(sys.argv[1]), Path("docs/experiments/results"), Path("docs/img")
root = f"{Path.cwd()}/"
copies = {f"{s}-tune/tuning.json": f"{s}-tuning.json" for s in ("task_incremental", "domain_incremental")}
copies |= {f"{s}-compare/comparison.json": f"{s}.json"
           for s in ("task_incremental", "domain_incremental", "six_tasks", "tiny")}
pictures = {f"{s}-compare/heatmaps.png": f"results_{s}_heatmaps.png"
            for s in ("task_incremental", "domain_incremental")}
pictures["six_tasks-compare/after_each_task.png"] = "results_six_tasks_after_each_task.png"
for source, name in copies.items():
    if (out / source).is_file():
        (results / name).write_text((out / source).read_text(encoding="utf-8").replace(root, ""), encoding="utf-8")
        print(f"{out / source} -> {results / name}")
for source, name in pictures.items():
    if (out / source).is_file():
        shutil.copyfile(out / source, pictures_dir / name)
        print(f"{out / source} -> {pictures_dir / name}")
EOF
  .venv/bin/python docs/experiments/results_tables.py
}

save() {  # what resume=true and publish need of every comparison block, into $CARRIED
  .venv/bin/python - "$OUT" "$CARRIED" "$0" <<'EOF'
import sqlite3
import sys
import tarfile
import tempfile
from pathlib import Path

from pipelines.errors import ConfigError
from pipelines.sweep_state import finished_report

out, carried = Path(sys.argv[1]), Path(sys.argv[2])
blocks = sorted(p for p in out.iterdir() if p.is_dir() and (p / "compare-state.json").is_file())
if not blocks:
    sys.exit(f"save: no comparison under {out}")


def finished(run: Path) -> bool:  # what resume=true skips (an unreadable report: not carried, run again)
    try:
        return finished_report(run) is not None
    except ConfigError:
        return False


with tempfile.TemporaryDirectory() as tmp, tarfile.open(f"{carried}.partial", "w:xz") as archive:
    held = {}  # finished runs per block, as counts() reads them back
    for block in blocks:
        held[block.name] = 0
        for path in sorted(p for p in block.iterdir() if p.is_file()):  # its state; its comparison once through
            archive.add(path, arcname=str(path))
        archive.add(block / "tokenizer", arcname=str(block / "tokenizer"))
        for report in sorted(block.glob("**/seed-*/report.json")):
            run = report.parent
            if finished(run):  # its report, matrix, config, per-example scores: no picture, replay store or tokenizer
                held[block.name] += 1
                for path in sorted(p for p in run.rglob("*") if p.is_file()):
                    if (path.parent == run and path.suffix != ".png") or path.parent == run / "example_scores":
                        archive.add(path, arcname=str(path))
        print(f"save: {block}")
    store = Path(tmp) / "mlflow.db"  # a consistent copy while runs write to it
    with sqlite3.connect("mlflow.db") as source, sqlite3.connect(store) as copy:
        source.backup(copy)
    archive.add(store, arcname="mlflow.db")
    for path in sorted(Path("mlartifacts").rglob("*")):  # the finished runs' small artifacts in the MLflow UI
        if path.is_file() and path.suffix != ".png":
            archive.add(path, arcname=str(path))


def counts(path: Path) -> dict[str, int]:  # finished runs a block holds in an archive, by the block's name
    with tarfile.open(path) as archive:
        names = [Path(m.name) for m in archive.getmembers() if m.name.endswith("/report.json") and "/seed-" in m.name]
    owners = [name.relative_to(out).parts[0] for name in names if name.is_relative_to(out)]
    return {block: owners.count(block) for block in set(owners)}


if carried.is_file():  # never an archive with fewer runs of a block than the one it replaces: restore first
    old = counts(carried)
    fewer = [f"{out / b} ({held.get(b, 0)} run(s) against {n})" for b, n in sorted(old.items()) if held.get(b, 0) < n]
    if fewer:
        Path(f"{carried}.partial").unlink()
        sys.exit(f"save: {carried} holds more finished runs than {out}: {'; '.join(fewer)}. Run "
                 f"`{sys.argv[3]} restore` first (it unpacks where nothing is); {carried} is left as it was")
Path(f"{carried}.partial").replace(carried)
print(f"save: {sum(held.values())} finished run(s) of {len(blocks)} block(s) -> {carried} "
      f"({carried.stat().st_size / 1e6:.2f} MB)")
EOF
}

restore() {  # $CARRIED unpacked where nothing is yet: a block already here, or a store, is left as it is
  .venv/bin/python - "$CARRIED" "$OUT" <<'EOF'
import sys
import tarfile
from pathlib import Path

carried, out = Path(sys.argv[1]), Path(sys.argv[2])


def top(name: Path) -> str:  # what is left as it is when here already: a block under $OUT, or a store
    return str(out / name.relative_to(out).parts[0]) if name.is_relative_to(out) and name != out else name.parts[0]


if not carried.is_file():
    sys.exit(f"restore: no {carried}: nothing to continue")
with tarfile.open(carried) as archive:
    members = archive.getmembers()
    tops = {top(Path(m.name)) for m in members}
    present = sorted(t for t in tops if Path(t).exists())
    for here in present:
        print(f"restore: {here} is here already: left as it is, nothing of it unpacked")
    chosen = [m for m in members if not any(m.name == t or m.name.startswith(f"{t}/") for t in present)]
    archive.extractall(".", members=chosen, filter="data")  # regular files under here only
print(f"restore: {len(chosen)} file(s) of {carried}")
EOF
}

all() {  # every block in turn, each continuing where it stopped (a comparison through is not run again): ~13 h
         # of the 2 cores from nothing
  if [ -f "$CARRIED" ]; then restore; fi
  tune task_incremental
  tune domain_incremental
  unless_through task_incremental-compare compare task_incremental
  unless_through domain_incremental-compare compare domain_incremental
  unless_through six_tasks-compare six
  unless_through task_incremental-random start task_incremental
  unless_through domain_incremental-random start domain_incremental
  unless_through domain_incremental-rate rate domain_incremental
  unless_through task_incremental-rate rate task_incremental
}

unless_through() {  # DIRECTORY COMMAND...: the command unless $OUT/DIRECTORY holds its comparison.json
  if [ -f "$OUT/$1/comparison.json" ]; then echo "$OUT/$1 is through: not run again"; else "${@:2}"; fi
}

"$@"
