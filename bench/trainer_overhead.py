"""What DeepSpeed and the scheduler cost on top of plain PyTorch, measured side by side in one run.

  step_time_ratio[zero<k>]   DeepSpeed engine step time / plain torch AdamW step time, same tiny T5,
                             same batches, same process (target <= 1.1 for ZeRO 0-2 on CPU)
  learner_step_time_ratio    the full Learner.train_task loop at zero_stage 2 as a one-worker run gets
                             it (ZeRO-1/2 run as stage 0 with one worker; tokenized plan, collation,
                             NaN check, LR schedule) / the plain loop
  between_task_overhead_s    in a real `forgetless run` on Ray: end of training task t to start of
                             task t+1, minus t's evaluation (target <= 2 s)

  python bench/trainer_overhead.py --json runs/bench/trainer_overhead.json
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import os
import sys
import tempfile
import time
from pathlib import Path

from common import add_baseline_options, baseline_report, quiet_environment, report  # noqa: E402

quiet_environment()

import torch  # noqa: E402

from pipelines.config import load_config, resolve_paths  # noqa: E402
from pipelines.learner import Learner, silence_library_noise  # noqa: E402
from pipelines.models import build_model, stream_tokenizer  # noqa: E402
from pipelines.plan import TaskPlan, build_plan  # noqa: E402
from pipelines.tasks import load_stream  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny" / "naive.yaml"


def _batches(learner: Learner, plan: TaskPlan, n: int) -> list[dict[str, torch.Tensor]]:
    """The plan's first ``n`` micro-batches, as the model is called with them (a ``StepBatch``'s
    ``inputs``; a ref older than the strategy plugins yields the dict itself)."""
    it = learner.batches(plan)
    return [getattr(batch, "inputs", batch) for batch in (next(it) for _ in range(n))]


def _time_plain(model: torch.nn.Module, batches, lr: float, clip: float) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    start = time.perf_counter()
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / len(batches)


def _time_engine(learner: Learner, batches) -> float:
    engine = learner.engine
    start = time.perf_counter()
    for batch in batches:
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
    return (time.perf_counter() - start) / len(batches)


def step_time_ratios(*, steps: int, repeats: int, stages: list[int]) -> dict:
    overrides = ["model.preset=small", "model.tokenizer.vocab_size=2000", "training.micro_batch_size=16",
                 "stream.max_source_tokens=64"]
    config = resolve_paths(load_config(CONFIG, overrides))
    stream = load_stream(config)
    tokenizer = stream_tokenizer(config.model, stream)
    tokdir = Path(tempfile.mkdtemp()) / "tokenizer"
    tokenizer.save_pretrained(tokdir)
    plan = dataclasses.replace(build_plan(config, stream, 0), num_steps=steps)
    results: dict = {"model_parameters": None, "batch": "16 x <=64 tokens", "steps": steps, "repeats": repeats}
    ratios, learner_ratio = {}, None
    for stage in stages:
        # The engine at the true stage, even with one process (no stage-0 shortcut) ...
        cfg = resolve_paths(load_config(CONFIG, [*overrides, f"training.zero_stage={stage}",
                                                 f"training.max_steps={steps}",
                                                 "training.single_worker_zero_as_stage0=false"]))
        learner = Learner(cfg, tokdir)
        # ... and, at stage 2, the Learner as a one-worker user gets it.
        configured = None
        if stage == 2:
            user_cfg = resolve_paths(load_config(CONFIG, [*overrides, "training.zero_stage=2",
                                                          f"training.max_steps={steps}"]))
            configured = Learner(user_cfg, tokdir)
        batches = _batches(learner, plan, steps)
        torch.manual_seed(cfg.seed)
        plain_model = build_model(cfg.model, tokenizer)
        results["model_parameters"] = sum(p.numel() for p in plain_model.parameters())
        plain_times, ds_times, learner_times = [], [], []
        _time_plain(plain_model, batches[:5], cfg.training.lr, cfg.training.grad_clip)  # warm-up both
        _time_engine(learner, batches[:5])
        for _ in range(repeats):  # interleaved, so drift in machine load hits both sides alike
            plain_times.append(_time_plain(plain_model, batches, cfg.training.lr, cfg.training.grad_clip))
            ds_times.append(_time_engine(learner, batches))
            if configured is not None:
                learner_times.append(configured.train_task(plan)["seconds"] / steps)
        plain = statistics.median(plain_times)
        ratios[f"zero{stage}"] = round(statistics.median(ds_times) / plain, 3)
        results[f"step_ms[zero{stage}]"] = {"plain": round(plain * 1e3, 2),
                                            "deepspeed": round(statistics.median(ds_times) * 1e3, 2),
                                            "plain_trials": _ms(plain_times), "deepspeed_trials": _ms(ds_times)}
        if learner_times:
            learner_ratio = round(statistics.median(learner_times) / plain, 3)
            results["step_ms[zero2]"]["learner"] = round(statistics.median(learner_times) * 1e3, 2)
            results["step_ms[zero2]"]["learner_trials"] = _ms(learner_times)
        print(f"  zero{stage}: plain {plain * 1e3:.1f} ms/step, deepspeed {statistics.median(ds_times) * 1e3:.1f} "
              f"ms/step (medians), ratio {ratios[f'zero{stage}']:.3f}", flush=True)
    results["step_time_ratio"] = ratios
    results["learner_step_time_ratio"] = learner_ratio
    results.update(sync_cadence(tokdir, plan, overrides=overrides, steps=steps, repeats=repeats))
    return results


def _ms(times: list[float]) -> list[float]:
    return [round(t * 1e3, 2) for t in times]


def _log_every(learner: Learner, every: int) -> Learner:
    training = learner.config.training.model_copy(update={"log_every_n_steps": every})
    learner.config = learner.config.model_copy(update={"training": training})
    return learner


def sync_cadence(tokdir: Path, plan: TaskPlan, *, overrides: list[str], steps: int, repeats: int) -> dict:
    """The training loop syncs with the host once per logging window (loss + non-finite check):
    its step time with a sync every step against every 10th. ~1 on a CPU, where there is no
    device queue to drain; the number that matters comes from infra/scripts/gpu_check.sh."""
    cfg = resolve_paths(load_config(CONFIG, [*overrides, "training.zero_stage=0"]))
    every_step, every_10th = _log_every(Learner(cfg, tokdir), 1), _log_every(Learner(cfg, tokdir), 10)
    times: dict[str, list[float]] = {"every_step": [], "every_10th": []}
    for _ in range(repeats):
        times["every_step"].append(every_step.train_task(plan)["seconds"] / steps)
        times["every_10th"].append(every_10th.train_task(plan)["seconds"] / steps)
    return {"sync_every_step_vs_every_10th": round(statistics.median(times["every_step"])
                                                   / statistics.median(times["every_10th"]), 3),
            "sync_step_ms_trials": {k: _ms(v) for k, v in times.items()}}


def between_task_overhead() -> dict:
    from actors.launch import run_experiment

    out = Path(tempfile.mkdtemp())
    config = resolve_paths(load_config(CONFIG, [f"output_dir={out / 'run'}", "training.max_steps=20",
                                                f"mlflow.tracking_uri=sqlite:///{out / 'mlflow.db'}",
                                                "checkpoint.models=all"]))
    report = run_experiment(config, progress=False)
    overheads = report.between_task_overhead_s
    return {"between_task_overhead_s": round(max(overheads), 3), "between_task_overhead_all_s": overheads,
            "eval_seconds": [round(report.train[t].eval_seconds, 3) for t in report.tasks]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--stages", default="0,1,2,3")
    add_baseline_options(parser)
    args = parser.parse_args()
    if args.baseline:  # the same command on this code and on REF's, side by side
        return baseline_report(__file__, args)
    silence_library_noise()
    print("step time, DeepSpeed vs plain torch AdamW (same model, same batches):", flush=True)
    results = step_time_ratios(steps=args.steps, repeats=args.repeats,
                               stages=[int(s) for s in args.stages.split(",")])
    print("between-task overhead in a real run (local Ray, 1 worker):", flush=True)
    results.update(between_task_overhead())
    results["machine"] = {"cpus": os.cpu_count(), "cuda": torch.cuda.is_available(), "torch": torch.__version__}
    results["targets"] = {"step_time_ratio[zero0-2]": "<= 1.1", "between_task_overhead_s": "<= 2"}
    ratios = results["step_time_ratio"]
    results["meets_targets"] = {
        **{f"step_time_ratio[zero{s}]": ratios[f"zero{s}"] <= 1.1 for s in (0, 1, 2) if f"zero{s}" in ratios},
        "learner_step_time_ratio": (results["learner_step_time_ratio"] or 0) <= 1.1,
        "between_task_overhead_s": results["between_task_overhead_s"] <= 2.0,
    }
    return report(results, args.json)


if __name__ == "__main__":
    sys.exit(main())
