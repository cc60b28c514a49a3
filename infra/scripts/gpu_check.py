"""One-GPU check of the trainer path, driving ``pipelines`` directly (no Ray, MLflow or registry).

For T5 and BART at the ``base`` preset, bf16, ZeRO-2 and ZeRO-3, on one GPU under an NCCL process
group:
  * every collective of the learner (windowed loss/finite check, evaluation, EWC's Fisher
    all-reduce, barriers) really goes through NCCL (forced even with one rank) — a host tensor
    fails here the way it would fail a multi-GPU run;
  * training throughput: tokens/s and an MFU estimate, 6 x parameters x tokens/s / peak bf16 FLOP/s;
  * the cost of syncing with the host every step (log_every_n_steps=1) against every 10th;
  * the training state saved, loaded into a fresh learner, and the next step's loss compared.

  infra/scripts/gpu_check.sh OUT_DIR                 on the GPU machine
  python infra/scripts/gpu_check.py --out DIR --smoke  on a CPU (tiny models, fp32, gloo): checks this script

Writes OUT_DIR/gpu_check.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

PEAK_BF16_FLOPS = 989e12  # H100/H200 SXM dense bf16 (vendor figure); a measured GEMM reaches ~790e12 here
WORDS = [f"w{i}" for i in range(3000)]


def write_task(path: Path, *, rows: int, source_words: int, target_words: int, seed: int) -> Path:
    """Synthetic text long enough to fill the token budget: the target is a function of the source."""
    rng = random.Random(seed)
    lines = []
    for _ in range(rows):
        source = [rng.choice(WORDS) for _ in range(source_words)]
        lines.append(json.dumps({"source": " ".join(source), "target": " ".join(sorted(source)[:target_words])}))
    path.write_text("\n".join(lines) + "\n")
    return path


def run_config(arch: str, zero: int, workdir: Path, *, smoke: bool) -> dict:
    data = [write_task(workdir / f"t{i}.jsonl", rows=256 if smoke else 4096, source_words=300, target_words=40,
                       seed=i) for i in range(2)]
    return {
        "experiment": "gpu-check", "seed": 0, "output_dir": str(workdir / f"{arch}-zero{zero}"),
        "model": {"arch": arch, "preset": "tiny" if smoke else "base",
                  "tokenizer": {"vocab_size": 600 if smoke else 8000}},
        "stream": {"cache_dir": str(workdir / "cache"), "max_source_tokens": 32 if smoke else 256,
                   "max_target_tokens": 8 if smoke else 32,
                   "tasks": [{"name": f"t{i}", "source": {"kind": "file", "path": str(p)}, "max_eval_examples": 64}
                             for i, p in enumerate(data)]},
        "training": {"zero_stage": zero, "precision": "auto", "micro_batch_size": 8 if smoke else 32,
                     "max_steps": 4 if smoke else 30, "lr": 1e-4, "log_every_n_steps": 10,
                     "single_worker_zero_as_stage0": False},
        "evaluation": {"batch_size": 64, "max_new_tokens": 8},
        # EWC needs full parameters (ZeRO <= 2); there it adds the Fisher's all-reduce to the check
        "strategy": {"name": "ewc", "fisher_examples": 8} if zero < 3 else {"name": "naive"},
    }


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_steps(learner, plan, steps: int, every: int) -> float:
    """Seconds per optimizer step over ``steps`` steps, syncing with the host every ``every`` steps."""
    learner.config = learner.config.model_copy(
        update={"training": learner.config.training.model_copy(update={"log_every_n_steps": every})})
    learner.strategy.after_task = lambda *a: None  # time training alone
    synchronize()
    start = time.perf_counter()
    learner.train_task(dataclasses.replace(plan, num_steps=steps))
    synchronize()
    return (time.perf_counter() - start) / steps


def check(arch: str, zero: int, workdir: Path, *, smoke: bool) -> dict:
    from pipelines.config import validate_config
    from pipelines.learner import Learner
    from pipelines.models import stream_tokenizer
    from pipelines.plan import EvalSet, build_plan
    from pipelines.tasks import load_stream

    config = validate_config(run_config(arch, zero, workdir, smoke=smoke))
    stream = load_stream(config)
    tokenizer_dir = Path(config.output_dir) / "tokenizer"
    stream_tokenizer(config.model, stream).save_pretrained(tokenizer_dir)
    learner = Learner(config, tokenizer_dir)
    learner.comm.force_communication = True  # one rank, but every collective through NCCL
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    plan = build_plan(config, stream, 0)
    training = config.training
    result = {"arch": arch, "zero_stage": zero, "precision": learner.precision, "device": str(learner.device),
              "backend": torch.distributed.get_backend(), "parameters": learner.num_parameters}

    learner.train_task(plan)  # warm-up, with the strategy's after-task collectives (EWC's Fisher)
    accuracies = learner.evaluate([EvalSet(t.name, t.metric, t.sources("eval"), t.targets("eval")) for t in stream])
    result["collectives"] = "ok"  # training windows, the Fisher, evaluation and barriers all went through
    result["eval_accuracy"] = accuracies

    steps = 4 if smoke else 20
    every_10 = timed_steps(learner, plan, steps, 10)
    every_1 = timed_steps(learner, plan, steps, 1)
    tokens_per_step = training.micro_batch_size * (config.stream.max_source_tokens + config.stream.max_target_tokens)
    tokens_per_s = tokens_per_step / every_10
    result.update({
        "step_s": round(every_10, 4), "tokens_per_s": round(tokens_per_s),
        "mfu": round(6 * learner.num_parameters * tokens_per_s / PEAK_BF16_FLOPS, 4),
        "sync_every_step_vs_every_10th": round(every_1 / every_10, 3),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
    })

    state = learner.save_state(Path(config.output_dir) / "state" / "check")
    restored = Learner(config, tokenizer_dir)
    restored.load_state(state)
    one_step = dataclasses.replace(plan, num_steps=1)
    for learner_ in (learner, restored):
        learner_.strategy.after_task = lambda *a: None
        learner_.config = learner_.config.model_copy(
            update={"training": learner_.config.training.model_copy(update={"log_every_n_steps": 1})})
    losses = []
    for learner_ in (learner, restored):
        torch.manual_seed(1234)  # one process, one global RNG: the same dropout masks for both
        losses.append(learner_.train_task(one_step)["mean_loss"])
    # bf16 kernels may reduce in another order from one engine to the next: equal to ~3 digits
    tolerance = 1e-6 if learner.precision == "fp32" else 1e-2
    result["restore"] = {"loss_saved": losses[0], "loss_restored": losses[1],
                         "matches": abs(losses[0] - losses[1]) <= tolerance * max(1.0, abs(losses[0]))}
    for learner_ in (learner, restored):
        learner_.engine.destroy()
    del learner, restored
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory for gpu_check.json")
    parser.add_argument("--smoke", action="store_true", help="tiny models on a CPU: check the script, not the GPU")
    parser.add_argument("--archs", default="t5,bart")
    parser.add_argument("--zero", default="2,3")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke to check the script on a CPU", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)  # one process, its own group on a free port, whoever started it
    from pipelines.learner import silence_library_noise

    silence_library_noise()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import deepspeed
    import transformers

    results = {"host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
               "transformers": transformers.__version__, "deepspeed": deepspeed.__version__,
               "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
               "peak_bf16_flops": PEAK_BF16_FLOPS, "runs": [], "failures": []}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as workdir:
        for arch in args.archs.split(","):
            for zero in (int(z) for z in args.zero.split(",")):
                try:
                    results["runs"].append(check(arch, zero, Path(workdir), smoke=args.smoke))
                except Exception as exc:  # noqa: BLE001 - report every configuration, then fail
                    results["failures"].append(f"{arch} zero{zero}: {type(exc).__name__}: {exc}")
                print(json.dumps(results["runs"][-1] if results["runs"] else results["failures"][-1]), flush=True)
    results["seconds"] = round(time.perf_counter() - started, 1)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2) + "\n")
    ok = not results["failures"] and all(r["restore"]["matches"] for r in results["runs"])
    print(f"{'ok' if ok else 'FAILED'}: {out / 'gpu_check.json'} ({results['seconds']} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
