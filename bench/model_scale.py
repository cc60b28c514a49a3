"""Full fine-tuning at the published model sizes, through `forgetless run`, on this machine.

The runs (``SIZES``): t5-small (60M), bart-base (140M) and t5-base (223M) on two workers at ZeRO-2,
12 steps a task; t5-base at ZeRO-3 (what stage 3 costs, at a size that fits); t5-large (738M) on two
workers at ZeRO-3 and on one worker, 4 steps a task. fp32, replay on, the memory check off (the
estimate is what is measured here; whether it would have refused is reported). Each:

  1. `forgetless run` of a one-task stream (sentiment_movies): optimizer steps of workers x MICRO
     sequences of <= SOURCE + TARGET tokens; the task's model and training state saved;
  2. `forgetless resume` of that run with a second task (sentiment_amazon): a finished stream
     extended, the saved state loaded, the second task trained, evaluated and saved.

Measured: each trainer worker's peak resident memory (sampled every 0.2 s) against the estimate for
its stage (pipelines/memory.py); step time and tokens/s (the tokens of the batches as fed, padding
included, at most); the same steps in one process through the Hugging Face Seq2SeqTrainer on the
same global batch (step-time ratio); the training state's bytes and the seconds to write the task's
model and state; evaluation seconds; resume seconds (the resumed run's wall time less its training,
evaluation and saving: Ray, the worker group, loading the state). A run that fails (out of memory)
is reported with its error. With ``--timeline``: each worker's memory over the run and its resume
(the largest sample of each second), the phases from the report (start-up, training, evaluation,
model and state written), and a plot of them, a panel a size.

  python bench/model_scale.py --json runs/bench/model_scale.json --plot docs/img/model_scale.png
  python bench/model_scale.py --sizes t5-small,bart-base    # a subset
  python bench/model_scale.py --sizes t5-base,t5-base/zero3 --timeline docs/img/model_scale_timeline.png
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import PeakMemory, add_baseline_options, baseline_report, quiet_environment, report

quiet_environment()

import psutil  # noqa: E402
import yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# name -> (arch, preset, ZeRO stage, workers, optimizer steps a task)
SIZES = {"t5-small": ("t5", "t5-small", 2, 2, 12), "bart-base": ("bart", "bart-base", 2, 2, 12),
         "t5-base": ("t5", "t5-base", 2, 2, 12), "t5-base/zero3": ("t5", "t5-base", 3, 2, 12),
         "t5-large/zero3": ("t5", "t5-large", 3, 2, 4), "t5-large/1-worker": ("t5", "t5-large", 0, 1, 4)}
MICRO, SOURCE, TARGET = 2, 64, 8
TASKS = ["sentiment_movies", "sentiment_amazon"]


def config(size: str, workdir: Path, tasks: list[str]) -> dict[str, Any]:
    arch, preset, stage, workers, steps = SIZES[size]
    return {
        "experiment": f"model-scale-{size.replace('/', '-')}", "seed": 0, "output_dir": str(workdir / "out"),
        "model": {"arch": arch, "preset": preset, "tokenizer": {"vocab_size": 8000}},
        "stream": {"max_source_tokens": SOURCE, "max_target_tokens": TARGET, "tasks": [
            {"name": name, "source": {"kind": "builtin", "name": name}, "max_train_examples": 512,
             "max_eval_examples": 32} for name in tasks]},
        "training": {"num_workers": workers, "zero_stage": stage, "micro_batch_size": MICRO, "max_steps": steps,
                     "lr": 1e-4, "log_every_n_steps": 4, "check_memory": False},  # measured, not refused
        "evaluation": {"batch_size": 16, "scoring": "likelihood"},
        "replay": {"memory_rows": 200, "rows_per_batch": 1},
        "strategy": {"name": "replay"},
        "checkpoint": {"models": "all"},
        "mlflow": {"tracking_uri": f"sqlite:///{workdir / 'mlflow.db'}"},
    }


class Failed(RuntimeError):
    def __init__(self, message: str, memory: dict[str, Any]):
        super().__init__(message)
        self.memory = memory


def forgetless(*args: str) -> tuple[float, str]:
    began = time.perf_counter()
    done = subprocess.run([str(Path(sys.executable).parent / "forgetless"), *args, "--no-progress"], cwd=REPO,
                          capture_output=True, text=True)
    if done.returncode:
        oom = re.search(r"Memory on the node [^)]*\) was [^)]*\)", done.stderr)
        why = f"Ray stopped it: {oom.group(0)}" if oom else done.stderr.strip()[-1500:]
        raise RuntimeError(f"forgetless {args[0]} failed (exit {done.returncode}): {why}")
    return time.perf_counter() - began, done.stderr


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def estimate_for(size: str, run_config: dict[str, Any], tokenizer_dir: Path) -> dict[str, Any]:
    from pipelines.config import RunConfig
    from pipelines.deepspeed_config import build_deepspeed_config
    from pipelines.memory import GIB, estimate, fits, host_bytes_needed, run_setting, shape_of
    from pipelines.models import count_parameters, hf_config, load_tokenizer

    cfg = RunConfig.model_validate(run_config)
    tokenizer = load_tokenizer(tokenizer_dir)
    model_config = hf_config(cfg.model, tokenizer)
    parameters = count_parameters(model_config, len(tokenizer))
    workers = cfg.training.num_workers
    ds = build_deepspeed_config(cfg.training, world_size=workers, precision="fp32", on_cuda=False)
    shape, setting = shape_of(model_config, parameters), run_setting(cfg, ds, on_cuda=False, precision="fp32")
    e = estimate(shape, setting)
    allowed = fits(shape, setting, host_bytes=psutil.virtual_memory().available, accelerator_bytes=None,
                   workers_per_host=workers)
    return {"parameters": parameters, "estimate_gib": round(e.host / GIB, 2),
            "estimate_all_workers_gib": round(host_bytes_needed(e, workers) / GIB, 2),
            "memory_check": "allows it" if allowed else "would refuse it",
            "estimate_parts_gib": {"model_states": round(e.model_states / GIB, 2), "buffers": round(e.buffers / GIB, 2),
                                   "activations": round(e.activations / GIB, 2)}}


# a command's phases, in the order they come (``phases``), and their shade in ``plot_timeline``
PHASE_COLOURS = {"start-up": "#dddddd", "training": "#c6dbef", "evaluation": "#fdd0a2",
                 "model + state written": "#c7e9c0", "end": "#f2f2f2"}


def phases(commands: list[tuple[str, float, float]], result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each command's spans, in seconds from the first command's start: before its task's training
    (Ray, the worker group, the model and engine, a resume's state loaded, the baseline
    evaluation), the training, the evaluation, the model and state written, the rest. A task's
    ``started_at``/``ended_at`` are the report's (wall clock); evaluation and saving follow in that
    order, for the seconds the report gives them."""
    zero, spans = commands[0][1], []
    for (command, began, ended), name in zip(commands, TASKS):
        task = result["train"][name]
        evaluated = task["ended_at"] + task["eval_seconds"]
        edges = [began, task["started_at"], task["ended_at"], evaluated, evaluated + task.get("save_seconds", 0.0),
                 ended]
        spans += [{"command": command, "phase": label, "from_s": round(a - zero, 1), "to_s": round(b - zero, 1)}
                  for label, a, b in zip(PHASE_COLOURS, edges, edges[1:])]
    return spans


def timeline(samples: list[tuple[float, dict[int, int]]], zero: float, every_s: float = 1.0) -> dict[str, Any]:
    """Each trainer worker's resident memory (GiB) over time, the largest sample of each ``every_s``
    window; workers in order of their first sample (a resume's workers are new processes)."""
    pids = list(dict.fromkeys(pid for _, seen in samples for pid in seen))
    windows: dict[int, dict[int, int]] = {}
    for t, seen in samples:
        window = windows.setdefault(int((t - zero) // every_s), {})
        for pid, rss in seen.items():
            window[pid] = max(window.get(pid, 0), rss)
    order = sorted(windows)
    return {"every_s": every_s, "t_s": [w * every_s for w in order],
            "workers_gib": [[round(windows[w][pid] / 2**30, 3) if pid in windows[w] else None for w in order]
                            for pid in pids]}


def ours(size: str, workdir: Path, *, with_timeline: bool = False) -> dict[str, Any]:
    first, second = workdir / "one-task.yaml", workdir / "two-tasks.yaml"
    first.write_text(yaml.safe_dump(config(size, workdir, TASKS[:1])))
    second.write_text(yaml.safe_dump(config(size, workdir, TASKS)))
    out = workdir / "out"
    watch = PeakMemory(timeline=with_timeline)
    commands = []
    try:
        began = time.time()
        run_s, _ = forgetless("run", str(first))
        commands.append(("run", began, time.time()))
        state_bytes = tree_bytes(out / "state")
        began = time.time()
        resume_s, _ = forgetless("resume", str(out), str(second))
        commands.append(("resume", began, time.time()))
    except RuntimeError as exc:
        raise Failed(str(exc), watch.stop()) from None
    memory = watch.stop()
    result = json.loads((out / "report.json").read_text())
    if with_timeline:
        memory["phases"] = phases(commands, result)
        memory["timeline"] = timeline(watch.samples, commands[0][1])
    stats = [result["train"][name] for name in TASKS]
    steps = sum(s["steps"] for s in stats)
    train_s = sum(s["seconds"] for s in stats)
    step_s = train_s / steps
    workers = SIZES[size][3]
    tokens_per_step = workers * MICRO * (SOURCE + TARGET)
    later = stats[1]
    return {"memory": memory, "steps": steps, "step_s": round(step_s, 3),
            "tokens_per_s_at_most": round(tokens_per_step / step_s, 1),
            "eval_s_per_task": round(statistics.mean(s["eval_seconds"] for s in stats), 2),
            "save_s_per_task": round(statistics.mean(s.get("save_seconds", 0.0) for s in stats), 2),
            "state_bytes_per_task": state_bytes, "run_wall_s": round(run_s, 1), "resume_wall_s": round(resume_s, 1),
            "resume_overhead_s": round(resume_s - later["seconds"] - later["eval_seconds"]
                                       - later.get("save_seconds", 0.0), 1),
            "acc_matrix": result["acc_matrix"], "status": result["status"],
            "tokenizer_dir": str(out / "tokenizer")}


def hf_part(size: str, tokenizer_dir: str) -> dict[str, Any]:
    """The same global batch (workers x MICRO sequences of SOURCE + TARGET tokens) in one process
    through Seq2SeqTrainer: a 2-step warm-up train(), then the size's steps timed."""
    import torch
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    from pipelines.config import ModelConfig
    from pipelines.learner import silence_library_noise
    from pipelines.models import build_model, load_tokenizer
    from trainer_vs_hf import Batches, first

    silence_library_noise()
    arch, preset, _, workers, steps = SIZES[size]
    tokenizer = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, preset=preset), tokenizer)
    generator = torch.Generator().manual_seed(0)
    batch = workers * MICRO

    def make() -> dict[str, torch.Tensor]:
        ids = torch.randint(5, len(tokenizer), (batch, SOURCE), generator=generator)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "labels": torch.randint(5, len(tokenizer), (batch, TARGET), generator=generator)}

    timings = []
    with tempfile.TemporaryDirectory() as out:
        for count in (2, steps):
            args = Seq2SeqTrainingArguments(output_dir=out, max_steps=count, per_device_train_batch_size=1,
                                            learning_rate=1e-4, optim="adamw_torch", save_strategy="no",
                                            report_to=[], disable_tqdm=True, use_cpu=True, logging_steps=10**6,
                                            remove_unused_columns=False, dataloader_num_workers=0)
            trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=Batches([make() for _ in range(count)]),
                                     data_collator=first)
            start = time.perf_counter()
            trainer.train()
            timings.append((time.perf_counter() - start) / count)
    return {"hf_step_s": round(timings[-1], 3)}


def plot(results: dict[str, Any], path: Path) -> None:
    """One panel a figure, each run a point against its parameters, named; a run that failed, its
    memory when it stopped (a cross)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["sizes"]
    panels = [("resident memory of the most loaded worker (GiB)", [("measured", "o", lambda e: e["memory"]["worker_peak_gib"]),
                                                                    ("estimate", "_", lambda e: e["estimate_gib"])]),
              ("seconds a step", [("ours", "o", lambda e: e.get("step_s")), ("HF Trainer, 1 process", "s",
                                                                            lambda e: e.get("hf_step_s"))]),
              ("training state a task (GB)", [("written", "o", lambda e: e.get("state_bytes_per_task", 0) / 1e9
                                               if "state_bytes_per_task" in e else None)]),
              ("seconds", [("model + state written", "o", lambda e: e.get("save_s_per_task")),
                           ("resume, less its training", "s", lambda e: e.get("resume_overhead_s"))])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.8))
    for ax, (title, series) in zip(axes, panels):
        for label, marker, value in series:
            points = [(e["parameters"] / 1e6, value(e), name) for name, e in runs.items() if value(e) is not None]
            if not points:
                continue
            ax.scatter([p for p, _, _ in points], [v for _, v, _ in points], marker=marker, s=40, label=label)
            for p, v, name in points:
                failed = "error" in runs[name]
                ax.annotate(name + (" (out of memory)" if failed else ""), (p, v), fontsize=6, xytext=(3, 3),
                            textcoords="offset points", color="red" if failed else "black")
        ax.set_xlabel("parameters (M)")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"Full fine-tuning on {results['machine']['cpus']} CPU cores, {results['machine']['memory_gib']} GiB, "
                 "fp32 (bench/model_scale.py)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def plot_timeline(results: dict[str, Any], path: Path) -> None:
    """A panel a run with a timeline: each worker's resident memory over the run and its resume,
    the phases shaded, the estimate for the stage dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    runs = {name: e for name, e in results["sizes"].items() if "timeline" in e.get("memory", {})}
    if not runs:
        raise SystemExit("--timeline: no run of this JSON has a timeline (measured with --timeline)")
    fig, axes = plt.subplots(len(runs), 1, figsize=(11, 2.8 * len(runs)), squeeze=False)
    for ax, (name, entry) in zip(axes[:, 0], runs.items()):
        memory = entry["memory"]
        for span in memory["phases"]:
            ax.axvspan(span["from_s"], span["to_s"], color=PHASE_COLOURS[span["phase"]], lw=0)
        resumed = next(s["from_s"] for s in memory["phases"] if s["command"] == "resume")
        ax.axvline(resumed, color="black", lw=0.8)
        ax.annotate("resume", (resumed, 0), xytext=(3, 3), textcoords="offset points", fontsize=7)
        line = memory["timeline"]
        for k, series in enumerate(line["workers_gib"]):
            ax.plot(line["t_s"], series, lw=1.2, label=f"worker process {k + 1}")
        ax.axhline(entry["estimate_gib"], color="black", ls="--", lw=0.8, label="estimate a worker")
        ax.set_title(f"{name}: {entry['parameters'] / 1e6:.0f}M parameters, ZeRO-{results['runs'][name]['zero_stage']}, "
                     f"{results['runs'][name]['workers']} worker(s)", fontsize=9)
        ax.set_ylabel("resident GiB")
        ax.set_ylim(bottom=0)
        handles, _ = ax.get_legend_handles_labels()
        ax.legend(handles=handles + [Patch(color=c, label=p) for p, c in PHASE_COLOURS.items()], fontsize=6,
                  loc="upper left", ncol=2)
    axes[-1, 0].set_xlabel("seconds from the run's start")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def replot(json_path: Path, path: Path | None, timeline_path: Path | None = None) -> None:
    results = json.loads(json_path.read_text())
    if path:
        plot(results, path)
    if timeline_path:
        plot_timeline(results, timeline_path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--timeline", type=Path, metavar="PNG", help="keep each worker's memory over time and the "
                        "phases of its run and resume, and plot them here (a panel a size)")
    parser.add_argument("--replot", type=Path, metavar="JSON", help="draw --plot (and --timeline) from an earlier "
                        "run's JSON")
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    add_baseline_options(parser)
    args = parser.parse_args()
    if args.baseline:  # the same command on this code and on REF's, side by side
        return baseline_report(__file__, args)
    if args.part:
        print(json.dumps(hf_part(args.part, args.tokenizer)))
        return 0
    if args.replot:
        replot(args.replot, args.plot, args.timeline)
        return 0
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total
                                                                                        / 2**30, 1)},
                               "micro_batch": MICRO, "tokens": f"{SOURCE} + {TARGET}",
                               "runs": {name: dict(zip(("arch", "preset", "zero_stage", "workers", "steps_per_task"),
                                                       spec)) for name, spec in SIZES.items()}, "sizes": {}}
    for size in args.sizes.split(","):
        print(f"{size}: forgetless run + resume ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix=f"model-scale-{size.replace('/', '-')}-") as tmp:
            workdir = Path(tmp)
            try:
                entry = ours(size, workdir, with_timeline=args.timeline is not None)
            except Failed as exc:
                results["sizes"][size] = {"error": str(exc)[-600:], "memory": exc.memory,
                                          **estimate_for(size, config(size, workdir, TASKS), workdir / "out" / "tokenizer")}
                print(f"  {exc}", file=sys.stderr, flush=True)
                continue
            entry.update(estimate_for(size, config(size, workdir, TASKS), Path(entry.pop("tokenizer_dir"))))
            done = subprocess.run([sys.executable, __file__, "--part", size, "--tokenizer",
                                   str(workdir / "out" / "tokenizer")], capture_output=True, text=True, cwd=REPO)
            if done.returncode == 0:
                entry.update(json.loads(done.stdout.strip().splitlines()[-1]))
                entry["step_time_ratio_vs_hf"] = round(entry["step_s"] / entry["hf_step_s"], 3)
            else:
                entry["hf_error"] = done.stderr.strip()[-600:]
        entry["memory_vs_estimate"] = round(entry["memory"]["worker_peak_gib"] / entry["estimate_gib"], 3)
        results["sizes"][size] = entry
        shown = {k: v for k, v in entry.items() if k != "acc_matrix"}
        shown["memory"] = {k: v for k, v in entry["memory"].items() if k not in ("timeline", "phases")}
        print(f"  {json.dumps(shown)}", file=sys.stderr, flush=True)
    if args.plot:
        plot(results, args.plot)
    if args.timeline:
        plot_timeline(results, args.timeline)
    return report(results, args.json)


if __name__ == "__main__":
    sys.exit(main())
