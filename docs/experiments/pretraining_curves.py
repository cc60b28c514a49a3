"""T5 vs BART pretraining curves, read back from MLflow: train loss, held-out denoising loss and
masked-token accuracy against tokens seen, for each checkpoint directory given.

  .venv/bin/python docs/experiments/pretraining_curves.py CHECKPOINT_DIR ... [--plot docs/img/pretraining_curves.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mlflow.tracking import MlflowClient

from pipelines.plots import save_figure


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--plot", type=Path, default=Path("docs/img/pretraining_curves.png"))
    args = parser.parse_args()
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for directory in args.checkpoints:
        manifest = json.loads((directory / "manifest.json").read_text())
        client = MlflowClient(manifest["mlflow"]["tracking_uri"])
        run_id = manifest["mlflow"]["run_id"]
        history = {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
                   for key in ("train_loss", "heldout_loss", "heldout_masked_token_accuracy", "tokens_seen")}
        tokens = dict(history["tokens_seen"])
        per_step = manifest["tokens_seen"] / manifest["steps"]
        label = f"{manifest['arch'].upper()} {manifest['preset']} ({manifest['objective']['name'].replace('_', ' ')})"
        for ax, key in zip(axes, ("train_loss", "heldout_loss", "heldout_masked_token_accuracy")):
            ax.plot([tokens.get(step, step * per_step) / 1e6 for step, _ in history[key]],
                    [value for _, value in history[key]], label=label, marker="." if key != "train_loss" else None)
    for ax, title in zip(axes, ("training loss", "held-out denoising loss (per target token)",
                                "held-out masked-token accuracy")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("tokens seen (millions)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("pretraining on the chitchat corpus, 2 CPU cores, seed 0")
    fig.tight_layout()
    save_figure(fig, args.plot)
    print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
