"""The comparison's plots (matplotlib, drawn without a display): accuracy vs MACs, accuracy vs measured
throughput, training curves, and each model's paired difference to the baseline with its interval."""

from __future__ import annotations

import io
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from visionmix.bench.results import RunOutcome
from visionmix.files import atomic_write

PLOTS = ("accuracy_vs_macs.png", "accuracy_vs_throughput.png", "training_curves.png", "differences.png")


def _save_figure(fig: Any, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    atomic_write(path, buffer.getvalue())


def _scatter(rows: Sequence[dict[str, Any]], key: str, scale: float, xlabel: str, title: str, path: Path) -> None:
    """Top-1 (with its std over seeds as an error bar) against ``rows[key] / scale``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.6), layout="constrained")
    ax = fig.add_subplot()
    points = [r for r in rows if r["top1"] is not None and r[key]]
    for r in points:
        x = r[key] / scale
        ax.errorbar(x, r["top1"], yerr=r["top1_std"] or 0.0, fmt="o", capsize=3)
        ax.annotate(r["model"], (x, r["top1"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if not points:
        ax.text(0.5, 0.5, "no model finished", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel=xlabel, ylabel="test top-1 (%)", title=title)
    ax.grid(True, alpha=0.3)
    _save_figure(fig, path)


def _curves(outcomes: Sequence[RunOutcome], path: Path) -> None:
    """Per model, the mean over seeds of training loss and test top-1 against the epoch."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(10, 4), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    by_model: dict[str, list[list[dict[str, Any]]]] = {}
    length: dict[str, float] = {}  # epochs trained: a partial last epoch ends there, not at its ordinal
    for o in outcomes:
        if o.summary is not None:
            by_model.setdefault(o.model, []).append(o.summary["history"])
            length[o.model] = o.summary.get("epochs_trained", o.summary["epochs"])  # older summaries: the recipe's
    for model, histories in by_model.items():
        epochs = sorted({h["epoch"] for history in histories for h in history})
        for ax, key in ((loss_ax, "train_loss"), (acc_ax, "eval_top1")):
            means = [statistics.fmean(h[key] for history in histories for h in history if h["epoch"] == e)
                     for e in epochs]
            ax.plot([min(e, length[model]) for e in epochs], means, marker="o", label=model)
    loss_ax.set(xlabel="epoch", ylabel="training loss", title="training loss")
    acc_ax.set(xlabel="epoch", ylabel="test top-1 (%)", title="test accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if by_model:
        acc_ax.legend(fontsize=8)
    _save_figure(fig, path)


def _differences(rows: Sequence[dict[str, Any]], baseline: str, path: Path) -> None:
    """One row per model: its mean paired difference to ``baseline`` with the 95% interval, a line at 0."""
    from matplotlib.figure import Figure

    points = [r for r in rows if r["model"] != baseline and r["delta"] is not None]
    fig = Figure(figsize=(6.4, 1.2 + 0.35 * max(len(points), 3)), layout="constrained")
    ax = fig.add_subplot()
    for y, r in enumerate(points):
        error = None if r["ci_low"] is None else [[r["delta"] - r["ci_low"]], [r["ci_high"] - r["delta"]]]
        ax.errorbar(r["delta"], y, xerr=error, fmt="o", capsize=3)
    if not points:
        ax.text(0.5, 0.5, "no model paired with the baseline yet", ha="center", va="center", transform=ax.transAxes)
    ax.axvline(0.0, color="grey", linewidth=1)
    ax.set_yticks(range(len(points)), [r["model"] for r in points])
    ax.set_ylim(max(len(points), 1) - 0.5, -0.5)  # the table's order, top to bottom
    ax.set(xlabel=f"top-1 minus {baseline}'s (points)", title=f"paired difference to {baseline} (95% CI over seeds)")
    ax.grid(True, axis="x", alpha=0.3)
    _save_figure(fig, path)


def write_plots(out_dir: Path, rows: Sequence[dict[str, Any]], outcomes: Sequence[RunOutcome], baseline: str,
                bench_batch_size: int) -> None:
    """Draw :data:`PLOTS` into ``out_dir``."""
    _scatter(rows, "macs", 1e6, "MMACs per image", "accuracy vs MACs", out_dir / PLOTS[0])
    _scatter(rows, "throughput", 1.0, f"images/s at batch {bench_batch_size}", "accuracy vs measured throughput",
             out_dir / PLOTS[1])
    _curves(outcomes, out_dir / PLOTS[2])
    _differences(rows, baseline, out_dir / PLOTS[3])
