"""Our learner against the Hugging Face Seq2SeqTrainer, side by side in one run.

  step_time_ratio_vs_hf     our Learner's step time / Seq2SeqTrainer's, same model and initial
                            weights, the same micro-batches (ours, handed to the Trainer whole),
                            steps, AdamW settings, gradient clipping, schedule and seed; medians of
                            interleaved repeats, each side of each repeat in a new process (the
                            Trainer in a plain Python, as its users run it). Beside it the Trainer
                            with its DeepSpeed integration (our engine's DeepSpeed config, started as
                            the `deepspeed` launcher starts a one-process job) — or its error.
  stream                    a whole 3-task stream (train each task, then evaluate every task by
                            generation; the untrained model first, as ours does): `forgetless run`'s
                            path on a local Ray against a plain Seq2SeqTrainer loop over the tasks
                            (a Trainer a task, one model), interleaved repeats (--stream-repeats,
                            medians and every trial). Ours twice per repeat: fresh (a new local
                            Ray, worker group and MLflow store: a first `forgetless run`) and warm
                            (a second run on the same Ray and worker group: a `compare`'s next run,
                            a job on a running cluster). Wall time split into start-up (ours: Ray
                            and the Ray Train worker group; the Trainer: building the model and its
                            first Trainer), training (and per task), evaluation and the rest, and
                            each process's whole life (imports included; ours: both runs); the
                            accuracy matrices, to show both sides trained alike.

The model is the small T5 preset (~1.4M parameters, the size bench/trainer_overhead.py uses) on the
tiny stream's tasks, micro-batches of 16 x <= 64 tokens, on whatever this machine has (2 CPU
cores here: one process, fp32).

  python bench/trainer_vs_hf.py --json runs/bench/trainer_vs_hf.json [--steps 40] [--repeats 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import add_baseline_options, baseline_report, quiet_environment, report, spread

quiet_environment()

import torch  # noqa: E402

from pipelines.config import RunConfig, load_config, resolve_paths  # noqa: E402
from pipelines.distributed import single_process_group_env  # noqa: E402
from pipelines.learner import Learner, silence_library_noise  # noqa: E402
from pipelines.models import build_model, load_tokenizer, stream_tokenizer  # noqa: E402
from pipelines.paradigms import eval_sets  # noqa: E402
from pipelines.plan import EvalSet, build_plan  # noqa: E402
from pipelines.scoring import METRICS  # noqa: E402
from pipelines.tasks import load_stream  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny" / "naive.yaml"
OVERRIDES = ["model.preset=small", "model.tokenizer.vocab_size=2000", "training.micro_batch_size=16",
             "stream.max_source_tokens=64"]


def hf_arguments(config: RunConfig, output_dir: Path, steps: int, *, deepspeed: dict | None = None,
                 batch_size: int | None = None) -> Any:
    """Seq2SeqTrainingArguments with our run's settings: what a user would set to match it."""
    from transformers import Seq2SeqTrainingArguments

    training = config.training
    return Seq2SeqTrainingArguments(
        output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=batch_size or training.micro_batch_size,
        per_device_eval_batch_size=config.evaluation.batch_size, learning_rate=training.lr,
        weight_decay=training.weight_decay, lr_scheduler_type=training.lr_schedule,
        warmup_steps=training.warmup_steps, max_grad_norm=training.grad_clip or 0.0, optim="adamw_torch",
        logging_steps=training.log_every_n_steps, save_strategy="no", eval_strategy="no", report_to=[],
        seed=config.seed, data_seed=config.seed, dataloader_num_workers=0, disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(), remove_unused_columns=False, predict_with_generate=True,
        deepspeed=deepspeed)


class Batches(torch.utils.data.Dataset):
    """Whole micro-batches as items: with batch size 1 and ``first`` as the collator, the Trainer
    steps on exactly the batches our learner steps on."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.batches[i]


def first(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return items[0]


def step_config(steps: int) -> RunConfig:
    return resolve_paths(load_config(CONFIG, [*OVERRIDES, f"training.max_steps={steps}"]))


def weights_digest(model: torch.nn.Module) -> float:
    """A fingerprint of the initial weights, to show every side started from the same ones."""
    return round(float(sum(p.double().abs().sum() for p in model.parameters())), 6)


def ours_steps(steps: int, workdir: Path) -> dict:
    """One repeat of our side: the Learner as a one-worker run gets it, a warm-up, then ``steps``
    steps of ``train_task``. The first repeat saves its batches for the Trainer's side."""
    config = step_config(steps)
    stream = load_stream(config)
    tokdir = workdir / "tokenizer"
    if not tokdir.exists():
        stream_tokenizer(config.model, stream).save_pretrained(tokdir)
    learner = Learner(config, tokdir)
    digest = weights_digest(learner.model)
    plan = build_plan(config, stream, 0)
    batches_file = workdir / "batches.pt"
    if not batches_file.exists():
        iterator = learner.batches(plan)
        torch.save([next(iterator).inputs for _ in range(steps)], batches_file)  # plain tensors: loads weights-only
    learner.train_task(dataclasses.replace(plan, num_steps=5))  # warm-up
    seconds = learner.train_task(plan)["seconds"]
    stage = learner.ds_config.get("zero_optimization", {}).get("stage", 0)
    parameters = sum(p.numel() for p in learner.model.parameters())
    learner.close()
    return {"step_s": seconds / steps, "initial_weights": digest, "zero_stage": stage, "parameters": parameters}


def hf_steps(steps: int, workdir: Path, deepspeed: bool) -> dict:
    """One repeat of the Trainer's side on our saved batches: a warm-up train(), then one of ``steps``
    steps, each timed from train() to its return (the Trainer is built beforehand)."""
    from transformers import Seq2SeqTrainer

    config = step_config(steps)
    tokenizer = load_tokenizer(workdir / "tokenizer")
    torch.manual_seed(config.seed)
    model = build_model(config.model, tokenizer)  # the weights our engine starts from (same seed)
    digest = weights_digest(model)
    batches = torch.load(workdir / "batches.pt", weights_only=True)
    ds_config = None
    if deepspeed:
        from pipelines.deepspeed_config import build_deepspeed_config

        ds_config = build_deepspeed_config(config.training, world_size=1, precision="fp32",
                                           on_cuda=torch.cuda.is_available())
        # the Trainer fills these from its arguments (its "batch" is one of our whole micro-batches)
        ds_config.update({key: "auto" for key in ("train_micro_batch_size_per_gpu", "train_batch_size",
                                                  "gradient_accumulation_steps", "gradient_clipping")})
    timings = []
    for part in (batches[:5], batches):
        args = hf_arguments(config, workdir / "hf", len(part), deepspeed=ds_config, batch_size=1)
        trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=Batches(part), data_collator=first)
        start = time.perf_counter()
        trainer.train()
        timings.append((time.perf_counter() - start) / len(part))
    return {"step_s": timings[-1], "initial_weights": digest}


# ----------------------------------------------------------------------------- the 3-task stream
def stream_config(steps: int, workdir: Path, name: str) -> RunConfig:
    return resolve_paths(load_config(CONFIG, [
        *OVERRIDES, f"training.max_steps={steps}", f"output_dir={workdir / name}",
        f"mlflow.tracking_uri=sqlite:///{workdir / 'mlflow.db'}", "checkpoint.models=last"]))


def ours_stream(steps: int, workdir: Path) -> dict:
    """`forgetless run`'s path twice: on a fresh local Ray (the Ray, the worker group and the MLflow
    store started for it: what a first `forgetless run` pays), then again on the same Ray and worker
    group (what a second run of a `compare`, or a job on a running cluster, pays)."""
    import ray

    from actors.sweep import run_timed
    from actors.cluster import connect_ray
    from actors.trainer_group import WorkerGroups

    tag = workdir.name
    config = stream_config(steps, workdir, "ours")
    began = time.perf_counter()
    connect_ray(config)  # the local Ray `forgetless run` starts
    ray_s = time.perf_counter() - began
    groups = WorkerGroups(workdir / "ray", name=f"trainer-vs-hf-{tag}")  # what `forgetless run` starts for itself
    try:
        fresh = run_timed(config, groups, progress=False)
        warm = run_timed(stream_config(steps, workdir, "ours-warm"), groups, progress=False)
    finally:
        groups.close()
        ray.shutdown()
    for run in (fresh, warm):
        if run.failure is not None:
            raise run.failure

    def parts(run: Any, ray_s: float) -> dict:
        train = sum(t.seconds for t in run.report.train.values())
        evaluate = sum(t.eval_seconds for t in run.report.train.values())
        return {"wall_s": round(ray_s + run.wall_s, 1), "startup_s": round(ray_s + run.startup_s, 1),
                "train_s": round(train, 1), "eval_s": round(evaluate, 1),
                "other_s": round(run.wall_s - run.startup_s - train - evaluate, 1),
                "train_s_per_task": [round(t.seconds, 2) for t in run.report.train.values()],
                "acc_matrix": [[None if a is None else round(a, 3) for a in row]  # None: a cell no metric reads
                               for row in run.report.acc_matrix],
                "baseline": [round(a or 0.0, 3) for a in run.report.baseline]}

    return {**parts(fresh, ray_s), "warm": parts(warm, 0.0)}


def hf_stream(steps: int, workdir: Path) -> dict:
    """What a user writes with the Hugging Face Trainer: a loop over the tasks, a Trainer a task
    (on the same model), predict() with generation on every task after each."""
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer

    began = time.perf_counter()
    config = stream_config(steps, workdir, "hf")
    stream = load_stream(config)
    tokenizer = stream_tokenizer(config.model, stream)
    torch.manual_seed(config.seed)
    model = build_model(config.model, tokenizer)
    collator = DataCollatorForSeq2Seq(tokenizer, model=model)
    limits = config.stream

    def encode(sources: list[str], targets: list[str]) -> list[dict]:
        enc = tokenizer(sources, truncation=True, max_length=limits.max_source_tokens)
        labels = tokenizer(text_target=targets, truncation=True, max_length=limits.max_target_tokens)["input_ids"]
        return [{"input_ids": ids, "labels": label} for ids, label in zip(enc["input_ids"], labels)]

    sets: list[EvalSet] = eval_sets(config, stream)
    eval_rows = [encode(s.sources, s.targets) for s in sets]  # with labels, as the library's example scripts tokenize

    def make_trainer(task_rows: list[dict] | None) -> Any:
        return Seq2SeqTrainer(model=model, args=hf_arguments(config, workdir / "hf", steps), data_collator=collator,
                              train_dataset=task_rows, processing_class=tokenizer)

    trainer = make_trainer(None)
    startup = time.perf_counter() - began
    train_s = eval_s = 0.0

    def evaluate(active: Any) -> list[float]:
        nonlocal eval_s
        start = time.perf_counter()
        scores = []
        for eval_set, rows in zip(sets, eval_rows):
            out = active.predict(rows, max_new_tokens=config.evaluation.max_new_tokens, num_beams=1)
            ids = out.predictions
            ids[ids < 0] = tokenizer.pad_token_id
            predictions = tokenizer.batch_decode(ids, skip_special_tokens=True)
            score = METRICS[eval_set.metric]
            scores.append(sum(score(p, t) for p, t in zip(predictions, eval_set.targets)) / len(predictions))
        eval_s += time.perf_counter() - start
        return scores

    baseline = evaluate(trainer)
    matrix, task_s = [], []
    for index in range(len(stream)):
        plan = build_plan(config, stream, index)
        rows = encode(plan.examples.column("source").to_pylist(), plan.examples.column("target").to_pylist())
        trainer = make_trainer(rows)
        start = time.perf_counter()
        trainer.train()
        task_s.append(time.perf_counter() - start)
        train_s += task_s[-1]
        matrix.append(evaluate(trainer))
    wall = time.perf_counter() - began
    return {"wall_s": round(wall, 1), "startup_s": round(startup, 1), "train_s": round(train_s, 1),
            "eval_s": round(eval_s, 1), "other_s": round(wall - startup - train_s - eval_s, 1),
            "train_s_per_task": [round(t, 2) for t in task_s],
            "acc_matrix": [[round(a, 3) for a in row] for row in matrix], "baseline": [round(a, 3) for a in baseline]}


SIDES = ("ours", "hf", "hf_deepspeed")
LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def child(part: str, steps: int, workdir: Path) -> dict:
    """Run one part in a new process, as its user would: the Trainer's sides in a plain Python (no
    process group, no launcher variables: else it wraps the model in DDP), its DeepSpeed side as the
    `deepspeed` launcher starts a one-process job. Returns the part's JSON line."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    if part == "hf_deepspeed":
        env.update(single_process_group_env())
    workdir.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--part", part, "--steps", str(steps), "--workdir", str(workdir)],
                          capture_output=True, text=True, env=env, timeout=3600)
    if done.returncode:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        raise RuntimeError(f"{part} failed: " + " | ".join(lines[-3:])[:600])
    # the whole process, Python's imports (torch, transformers, Ray) included
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "process_s": round(time.perf_counter() - began, 1)}


def run_part(part: str, steps: int, workdir: Path) -> dict:
    silence_library_noise()
    if part == "ours":
        return ours_steps(steps, workdir)
    if part in ("hf", "hf_deepspeed"):
        return hf_steps(steps, workdir, deepspeed=part == "hf_deepspeed")
    if part == "stream_ours":
        return ours_stream(steps, workdir)
    return hf_stream(steps, workdir)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--steps", type=int, default=40, help="steps a repeat of the step-time comparison")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--stream-steps", type=int, default=60, help="steps a task in the 3-task stream")
    parser.add_argument("--stream-repeats", type=int, default=3, help="interleaved repeats of the stream comparison")
    parser.add_argument("--part", choices=[*SIDES, "stream_ours", "stream_hf"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    add_baseline_options(parser)
    args = parser.parse_args()
    if args.baseline:  # the same command on this code and on REF's, side by side
        return baseline_report(__file__, args)
    if args.part:  # a child: one part, its result as the last line
        print(json.dumps(run_part(args.part, args.steps, args.workdir)))
        return 0
    import transformers

    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "cuda": torch.cuda.is_available(),
                                           "torch": torch.__version__, "transformers": transformers.__version__},
                               "steps": args.steps, "repeats": args.repeats, "micro_batch": "16 x <= 64 tokens"}
    with tempfile.TemporaryDirectory(prefix="trainer-vs-hf-") as tmp:
        workdir = Path(tmp)
        print("step time, our learner vs Seq2SeqTrainer (same model, batches, optimizer, seed), each repeat "
              "a new process per side:", file=sys.stderr, flush=True)
        times: dict[str, list[float]] = {side: [] for side in SIDES}
        digests: dict[str, set[float]] = {side: set() for side in SIDES}
        errors: dict[str, str] = {}
        for repeat in range(args.repeats):  # interleaved: drift in the machine's load hits every side alike
            for side in SIDES:
                if side in errors:
                    continue
                try:
                    out = child(side, args.steps, workdir)
                except RuntimeError as exc:
                    if side == "ours":
                        raise
                    errors[side] = str(exc)
                    print(f"  {side}: {exc}", file=sys.stderr, flush=True)
                    continue
                times[side].append(out["step_s"])
                digests[side].add(out["initial_weights"])
                if side == "ours":
                    results.update(model_parameters=out["parameters"], zero_stage_ours=out["zero_stage"])
            print(f"  repeat {repeat + 1}: " + ", ".join(f"{side} {times[side][-1] * 1e3:.1f} ms/step"
                                                         for side in SIDES if side not in errors),
                  file=sys.stderr, flush=True)
        medians = {side: statistics.median(t) for side, t in times.items() if t}
        results["same_initial_weights"] = len(set().union(*digests.values())) == 1
        results["step_ms"] = {side: round(m * 1e3, 2) for side, m in medians.items()}
        results["step_ms_trials"] = {side: [round(t * 1e3, 2) for t in v] for side, v in times.items() if v}
        results["step_time_ratio_vs_hf"] = round(medians["ours"] / medians["hf"], 3)
        if "hf_deepspeed" in medians:
            results["step_time_ratio_vs_hf_deepspeed"] = round(medians["ours"] / medians["hf_deepspeed"], 3)
        results["errors"] = errors
        print(f"a 3-task stream, {args.stream_steps} steps a task, {args.stream_repeats} interleaved repeats: the "
              "Seq2SeqTrainer loop, then `forgetless run`'s path (fresh, then warm)", file=sys.stderr, flush=True)
        trials: dict[str, list[dict]] = {"hf": [], "ours": [], "ours_warm": []}
        for repeat in range(args.stream_repeats):
            trials["hf"].append(child("stream_hf", args.stream_steps, workdir / f"hf-{repeat}"))
            ours = child("stream_ours", args.stream_steps, workdir / f"ours-{repeat}")
            trials["ours_warm"].append(ours.pop("warm"))
            trials["ours"].append(ours)
            print(f"  repeat {repeat + 1}: " + ", ".join(f"{side} {t[-1]['wall_s']} s" for side, t in trials.items()),
                  file=sys.stderr, flush=True)
    wall = {side: spread([t["wall_s"] for t in ts], 1) for side, ts in trials.items()}
    results["stream"] = {
        "steps_per_task": args.stream_steps, "repeats": args.stream_repeats, "wall_s": wall,
        "wall_ratio_vs_hf": round(wall["ours"]["median"] / wall["hf"]["median"], 3),
        "warm_wall_ratio_vs_hf": round(wall["ours_warm"]["median"] / wall["hf"]["median"], 3),
        "train_ratio_vs_hf": round(statistics.median(t["train_s"] for t in trials["ours"])
                                   / statistics.median(t["train_s"] for t in trials["hf"]), 3),
        "trials": trials}
    return report(results, args.json)


if __name__ == "__main__":
    sys.exit(main())
