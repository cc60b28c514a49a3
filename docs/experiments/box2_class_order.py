"""The lecture's Box 2, measured: one multi-class task trained class by class vs shuffled.

Trains the config's first task twice from the same initial weights — examples grouped by class
(``order: by_class``) and shuffled — and evaluates every class's accuracy every
``training.log_every_n_steps`` steps. Writes ``<output_dir>/box2.json`` and a plot of the curves
(``--plot``, default ``docs/img/box2_class_order.png``).

  .venv/bin/python docs/experiments/box2_class_order.py configs/box2_class_order.yaml [key=value ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tqdm.auto import tqdm  # noqa: E402

from pipelines.config import load_config, resolve_paths  # noqa: E402
from pipelines.learner import Learner, silence_library_noise  # noqa: E402
from pipelines.models import stream_tokenizer  # noqa: E402
from pipelines.plan import EvalSet, build_plan  # noqa: E402
from pipelines.plots import save_figure  # noqa: E402
from pipelines.tasks import load_stream  # noqa: E402

PER_CLASS = 40  # eval examples per class


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--plot", type=Path, default=Path("docs/img/box2_class_order.png"))
    args = parser.parse_args()
    silence_library_noise()
    config = resolve_paths(load_config(args.config, args.overrides))
    stream = load_stream(config)
    task = stream[0]
    sources, targets = task.sources("eval"), task.targets("eval")
    classes = sorted(set(task.targets("train")))
    eval_sets = [EvalSet(c, task.metric, [s for s, t in zip(sources, targets) if t == c][:PER_CLASS],
                         [c] * min(PER_CLASS, targets.count(c))) for c in classes]
    curves = {}
    with tempfile.TemporaryDirectory() as tmp:
        stream_tokenizer(config.model, stream).save_pretrained(tmp)
        for order in ("by_class", "shuffled"):
            learner = Learner(config, tmp)  # same seed: the same initial weights for both orders
            plan = dataclasses.replace(build_plan(config, stream, 0), order=order, model_dir=None, state_dir=None)
            points = [{"step": 0, **learner.evaluate(eval_sets)}]
            bar = tqdm(total=plan.num_steps, desc=order, unit="step")

            def on_step(step: int, total: int, loss: float, metrics: dict) -> None:
                points.append({"step": step + 1, "loss": loss, **learner.evaluate(eval_sets)})
                bar.n = step + 1
                bar.refresh()

            learner.train_task(plan, on_step=on_step)
            bar.close()
            curves[order] = points
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {"task": task.name, "classes": classes, "train_rows_per_class": {
        c: task.targets("train").count(c) for c in classes}, "eval_per_class": {s.name: len(s.targets) for s in eval_sets},
              "steps": plan.num_steps, "micro_batch_size": config.training.micro_batch_size, "seed": config.seed,
              "curves": curves}
    (out / "box2.json").write_text(json.dumps(result, indent=2))
    _plot(result, args.plot)
    for order, points in curves.items():
        final = points[-1]
        print(f"{order:>9}: final per-class accuracy " + ", ".join(f"{c} {final[c]:.2f}" for c in classes))
    print(f"curves: {out / 'box2.json'}\nplot:   {args.plot}")
    return 0


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for ax, order in zip(axes, ("by_class", "shuffled")):
        points = result["curves"][order]
        steps = [p["step"] for p in points]
        for c in result["classes"]:
            ax.plot(steps, [p[c] for p in points], label=c, marker=".", linewidth=1.2)
        ax.set_title({"by_class": "examples grouped class by class", "shuffled": "examples shuffled"}[order])
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy on the class (exact match)")
    axes[1].legend(title="class", fontsize=8, loc="lower right")
    fig.suptitle(f"{result['task']}: per-class accuracy during one pass over the training data")
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())
