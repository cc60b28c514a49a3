"""Pictures of a run: the accuracy heatmap read in the MLflow UI and the README."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on workers or CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipelines.metrics import ForgettingMatrix  # noqa: E402
from storage.files import write_atomic  # noqa: E402


def save_figure(fig: plt.Figure, path: str | Path) -> Path:
    """Write the figure whole (temp + rename): a reader never sees half a PNG."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return write_atomic(path, buffer.getvalue(), durable=False)


ANNOTATED_TASKS = 12  # beyond this many tasks the cells are too small to print their values in


def plot_heatmap(matrix: ForgettingMatrix, path: str | Path, *, title: str = "") -> Path:
    """Rows: trained up to (a first row for "before training"); columns: evaluated on. Each cell
    carries its value up to ANNOTATED_TASKS tasks; a longer stream gets smaller cells instead (the
    figure stays the size of a 12-task one up to ~35 tasks) and its values are read from the colour,
    or from acc_matrix.json."""
    values = np.vstack([matrix.baseline[None, :], matrix.acc])
    rows = ["before training"] + [f"after {name}" for name in matrix.tasks]
    cell = 1.0 if matrix.num_tasks <= ANNOTATED_TASKS else max(0.35, ANNOTATED_TASKS / matrix.num_tasks)
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * cell * matrix.num_tasks, 1.2 + 0.55 * cell * len(rows)))
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(matrix.num_tasks), matrix.tasks, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.axhline(0.5, color="white", linewidth=2)
    ax.set_xlabel("evaluated on")
    ax.set_ylabel("trained up to")
    if matrix.num_tasks <= ANNOTATED_TASKS:
        for (r, c), value in np.ndenumerate(values):
            if not np.isnan(value):
                ax.text(c, r, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black")
    else:
        ax.tick_params(labelsize=7)
    fig.colorbar(image, ax=ax, label="accuracy")
    ax.set_title(title or "accuracy matrix")
    fig.tight_layout()
    return save_figure(fig, Path(path))


def plot_comparison(matrices: dict[str, ForgettingMatrix], directory: str | Path) -> list[Path]:
    """Two pictures of a comparison: accuracy on the first task across the stream (a line per
    strategy, starting before training), and the strategies' heatmaps side by side."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = list(matrices)
    tasks = matrices[names[0]].tasks

    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(tasks), 3.6))
    x = np.arange(len(tasks) + 1)
    for name in names:
        m = matrices[name]
        ax.plot(x, np.concatenate([[m.baseline[0]], m.acc[:, 0]]), marker="o", label=name)
    ax.set_xticks(x, ["before"] + [f"after {t}" for t in tasks], rotation=20, ha="right")
    ax.set_ylabel(f"accuracy on {tasks[0]}")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("the first task across the stream")
    ax.legend(fontsize=8)
    fig.tight_layout()
    first_task = save_figure(fig, directory / "first_task_accuracy.png")

    fig, axes = plt.subplots(1, len(names), figsize=(0.6 + 2.2 * len(names) * max(1, len(tasks) / 3), 3.4),
                             squeeze=False)
    for ax, name in zip(axes[0], names):
        acc = matrices[name].acc
        ax.imshow(np.ma.masked_invalid(acc), cmap="viridis", vmin=0.0, vmax=1.0)
        for (r, c), value in np.ndenumerate(acc):
            if not np.isnan(value):
                ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if value < 0.6 else "black")
        for r in np.flatnonzero(np.isnan(acc).all(axis=1)):
            ax.text((len(tasks) - 1) / 2, r, "no training here", ha="center", va="center", fontsize=7, color="gray")
        ax.set_title(name)
        ax.set_xticks(range(len(tasks)), tasks, rotation=40, ha="right", fontsize=7)
        ax.set_yticks(range(len(tasks)), [f"after {t}" for t in tasks] if ax is axes[0][0] else [""] * len(tasks),
                      fontsize=7)
    fig.suptitle("accuracy matrices (rows: trained up to; columns: evaluated on)", fontsize=9)
    fig.tight_layout()
    heatmaps = save_figure(fig, directory / "heatmaps.png")
    return [first_task, heatmaps]


def plot_curves(curves: dict[str, dict[str, list[dict]]], path: str | Path) -> Path:
    """Average accuracy and forgetting after each task, against the number of tasks seen: a line per
    strategy (its runs' mean), a band for the 95% interval over them (``actors.compare.after_each_task``);
    a strategy with one defined point (joint: after the last task) is a lone marker."""
    metrics = list(next(iter(curves.values())))
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {name: palette[i % len(palette)] for i, name in enumerate(curves)}  # one colour a strategy, every panel
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for name, curve in curves.items():
            defined = [(t + 1, p["mean"], p["ci95"] or 0.0) for t, p in enumerate(curve[metric])
                       if p["mean"] is not None]
            if not defined:
                continue
            x, mean, half = (np.array(column) for column in zip(*defined))
            ax.plot(x, mean, marker="o", markersize=3, color=colors[name])
            ax.fill_between(x, mean - half, mean + half, color=colors[name], alpha=0.15, linewidth=0)
        ax.set_xticks(range(1, max(len(curve[metric]) for curve in curves.values()) + 1))
        ax.set_xlabel("tasks seen")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} after each task")
    handles = [plt.Line2D([], [], color=colors[name], marker="o", markersize=3, label=name) for name in curves]
    axes[0][0].legend(handles=handles, fontsize=7)
    fig.tight_layout()
    return save_figure(fig, Path(path))
