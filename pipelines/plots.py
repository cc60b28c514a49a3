"""Pictures of a run: the accuracy heatmap read in the MLflow UI and the README."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on workers or CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipelines.metrics import ForgettingMatrix  # noqa: E402


def plot_heatmap(matrix: ForgettingMatrix, path: str | Path, *, title: str = "") -> Path:
    """Rows: trained up to (a first row for "before training"); columns: evaluated on."""
    values = np.vstack([matrix.baseline[None, :], matrix.acc])
    rows = ["before training"] + [f"after {name}" for name in matrix.tasks]
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * matrix.num_tasks, 1.2 + 0.55 * len(rows)))
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(matrix.num_tasks), matrix.tasks, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.axhline(0.5, color="white", linewidth=2)
    ax.set_xlabel("evaluated on")
    ax.set_ylabel("trained up to")
    for (r, c), value in np.ndenumerate(values):
        if not np.isnan(value):
            ax.text(c, r, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black")
    fig.colorbar(image, ax=ax, label="accuracy")
    ax.set_title(title or "accuracy matrix")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
