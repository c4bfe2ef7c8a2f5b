"""Plots and small reports written next to results (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _finish(fig: plt.Figure, ax: plt.Axes, path: Path, grid_axis: str = "y", legend: bool = True) -> Path:
    """Legend, light grid, tight layout; write the PNG and free the figure."""
    if legend:
        ax.legend(fontsize=8)
    ax.grid(True, axis=grid_axis, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_losses(records: list[dict[str, Any]], path: str | Path) -> Path:
    """Total, per-level and rgb loss against step (log scale) as a PNG."""
    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    steps = [r["step"] for r in records]
    extras = [k for k in ("loss_logits", "loss_rgb") if any(k in r for r in records)]
    keys = ["loss"] + sorted({k for r in records for k in r if k.startswith("loss_level_")}) + extras
    for key in keys:
        label = "total" if key == "loss" else key.replace("loss_level_", "level ").replace("loss_rgb", "rgb").replace("loss_logits", "KL to teacher logits")
        ax.plot(steps, [r.get(key, float("nan")) for r in records], label=label, linewidth=2 if key == "loss" else 1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("APM student distillation loss")
    return _finish(fig, ax, path, grid_axis="both")


def plot_fidelity(fidelity: dict[str, dict[str, float]], path: str | Path) -> Path:
    """Explained variance R^2 per level (patch and prefix tokens; 0 = the mean-token baseline), values on the bars.
    Falls back to cosine for reports without a baseline."""
    path = Path(path)
    layers = list(fidelity)
    metric = "r2" if any("patch_r2" in f for f in fidelity.values()) else "cosine"
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(layers) + 2), 3.5), dpi=120)
    width = 0.38
    for offset, part in ((-width / 2, "patch"), (width / 2, "prefix")):
        values = [fidelity[layer].get(f"{part}_{metric}", float("nan")) for layer in layers]
        bars = ax.bar([i + offset for i in range(len(layers))], values, width, label=f"{part} tokens")
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks(range(len(layers)), [f"layer {layer}" for layer in layers])
    low = min(0.0, *(v for f in fidelity.values() for k, v in f.items() if k.endswith(f"_{metric}") and "baseline" not in k))
    ax.set_ylim(low, 1.08)
    ax.set_ylabel("R² vs mean-token baseline" if metric == "r2" else "mean cosine to teacher")
    ax.set_title("Student fidelity per level")
    return _finish(fig, ax, path)


MAX_CLASS_BARS = 40


def plot_per_class(per_class: dict[str, list[float]], title: str, path: str | Path, class_names: list[str] | None = None) -> Path:
    """Top-1 accuracy per class, student beside teacher: one bar pair per class up to ``MAX_CLASS_BARS`` classes,
    else the distribution of per-class accuracies (a histogram stays readable for 1,000+ classes)."""
    path = Path(path)
    classes = len(per_class["student"])
    if classes > MAX_CLASS_BARS:
        return _per_class_histogram(per_class, title, path)
    fig, ax = plt.subplots(figsize=(max(5, 0.45 * classes + 2), 3.8), dpi=120)
    width = 0.4
    for offset, who in ((-width / 2, "student"), (width / 2, "teacher")):
        ax.bar([i + offset for i in range(classes)], per_class[who], width, label=who)
    names = class_names if class_names and len(class_names) == classes else [str(i) for i in range(classes)]
    ax.set_xticks(range(classes), names, rotation=45 if classes > 12 else 0, fontsize=7 if classes > 12 else 9)
    ax.set_ylim(0, 1.18)  # headroom: the legend sits above the bars, never on them
    ax.set_ylabel("top-1 accuracy")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    return _finish(fig, ax, path, legend=False)


def _per_class_histogram(per_class: dict[str, list[float]], title: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=120)
    bins = [i / 20 for i in range(21)]
    for who in ("student", "teacher"):
        values = [v for v in per_class[who] if v == v]  # classes absent from the samples are NaN
        ax.hist(values, bins=bins, alpha=0.55, label=f"{who} ({len(values)} classes)")
    ax.set_xlabel("per-class top-1 accuracy")
    ax.set_ylabel("classes")
    ax.set_title(title)
    return _finish(fig, ax, path)
