"""Files written next to results: the eval report (JSON and its plots, shared by ``eval`` and ``demo``) and the
plots themselves.

Figures are plain :class:`matplotlib.figure.Figure` objects saved straight to PNG: no pyplot, no backend to
select, no global figure registry (nothing here touches process state).
"""

from __future__ import annotations

import hashlib
import json
import math
import posixpath
from pathlib import Path
from typing import Any

import fsspec
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from apmpipe.storage.remote import canonical_url

from .console import MISSING

EVAL_JSON = "eval.json"


def write_eval_report(report: dict[str, Any], folder: Path) -> Path:
    """Write an eval report into ``folder``: the JSON (``eval.json``, from ``apmpipe eval`` and the demo alike), the
    fidelity plot and one per-class plot per classifier; returns the JSON's path."""
    folder.mkdir(parents=True, exist_ok=True)
    json_path = folder / EVAL_JSON
    json_path.write_text(report_json(report))
    plot_fidelity(report["fidelity"], folder / "fidelity.png")
    for key, result in report["classification"].items():
        if isinstance(result, dict) and "per_class" in result:
            plot_per_class(result["per_class"], f"{result['method']}: per-class top-1", folder / f"per_class_{key}.png")
    return json_path


def report_json(data: Any) -> str:
    """``data`` as JSON, a NaN or infinite number (a figure that does not exist) written as ``null``: JSON has no
    NaN, and strict readers refuse it."""

    def finite(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(v) for v in value]
        return value

    return json.dumps(finite(data), indent=2, allow_nan=False, default=str)


def eval_folder(student: str, cache: str, storage_options: dict[str, Any] | None = None) -> str:
    """The default report folder of ``apmpipe eval``: ``RUN_DIR/eval-<cache name>-<8 hex digits>`` (the run local or
    a URL), the digits a hash of the cache's canonical URL: ``data/a/val.zarr`` and ``data/b/val.zarr`` get a folder
    each, while one cache spelt two ways (relative, absolute, trailing slash) gets one."""
    fs, path = fsspec.core.url_to_fs(student, **(storage_options or {}))
    run_dir = student.rstrip("/") if fs.isdir(path) else (posixpath.dirname(student.rstrip("/")) or ".")
    digest = hashlib.sha1(canonical_url(cache).encode()).hexdigest()[:8]
    return f"{run_dir}/eval-{Path(cache.rstrip('/')).stem}-{digest}"


def _figure(width: float, height: float) -> tuple[Figure, Axes]:
    fig = Figure(figsize=(width, height), dpi=120)
    return fig, fig.subplots()


def _finish(
    fig: Figure, ax: Axes, path: Path, grid_axis: str = "y", legend: str | None = "best", outside_at: float = 1.01
) -> Path:
    """Legend (at ``legend``: a matplotlib location, ``outside`` right of the axes at ``outside_at`` axes widths, or
    None), light grid, tight layout; write the PNG."""
    if legend == "outside":
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(outside_at, 1.0))
    elif legend:
        ax.legend(fontsize=8, loc=legend)
    ax.grid(True, axis=grid_axis, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return path


LEVEL_DASHES = ("-", "--", ":", "-.")  # levels' losses are often close: a dash per level keeps each one visible


def plot_losses(records: list[dict[str, Any]], path: str | Path) -> Path:
    """Total, per-level (in layer order) and rgb loss against step (log scale) as a PNG, and the held-out R^2 of
    ``train --val`` on a right-hand axis; the legend beside the axes, where it hides no line."""
    path = Path(path)
    fig, ax = _figure(8.5, 4)
    held_out = [r for r in records if "val_r2" in r]
    records = [r for r in records if "loss" in r]
    steps = [r["step"] for r in records]
    levels = sorted({int(k.rsplit("_", 1)[1]) for r in records for k in r if k.startswith("loss_level_")})
    extras = {"loss_logits": "KL to teacher logits", "loss_rgb": "rgb"}
    series = [("loss", "total", {"linewidth": 2})]
    series += [(f"loss_level_{n}", f"level {n}", {"linestyle": LEVEL_DASHES[i % 4]}) for i, n in enumerate(levels)]
    series += [(key, label, {}) for key, label in extras.items() if any(key in r for r in records)]
    for key, label, style in series:
        ax.plot(steps, [r.get(key, float("nan")) for r in records], label=label, **{"linewidth": 1, **style})
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("APM student distillation loss")
    if held_out:
        _plot_held_out(ax, held_out)
    return _finish(fig, ax, path, grid_axis="both", legend="outside", outside_at=1.12 if held_out else 1.01)


def _plot_held_out(ax: Axes, records: list[dict[str, Any]]) -> None:
    """``train --val``'s scores on a right-hand axis (R^2: 0 is the mean-token baseline), in the loss's legend."""
    style = {"color": "black", "marker": "o", "markersize": 3, "linewidth": 1}
    label = "held-out R² (right axis)"
    right = ax.twinx()
    values = [r["val_r2"] for r in records]
    right.plot([r["step"] for r in records], values, **style)
    right.set_ylim(min(0.0, *values), 1.0)
    right.set_ylabel("held-out R² (mean token: 0)")
    ax.plot([], [], label=label, **style)  # the legend is the loss axes'


def plot_fidelity(fidelity: dict[str, dict[str, float]], path: str | Path) -> Path:
    """Explained variance R^2 per level (patch and prefix tokens; 0 = the mean-token baseline), values on the bars.
    Falls back to cosine for reports without a baseline."""
    path = Path(path)
    layers = list(fidelity)
    metric = "r2" if any("patch_r2" in f for f in fidelity.values()) else "cosine"
    fig, ax = _figure(max(4, 1.2 * len(layers) + 2), 3.5)
    width = 0.38
    for offset, part in ((-width / 2, "patch"), (width / 2, "prefix")):
        values = [fidelity[layer].get(f"{part}_{metric}", float("nan")) for layer in layers]
        bars = ax.bar([i + offset for i in range(len(layers))], values, width, label=f"{part} tokens")
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks(range(len(layers)), [f"layer {layer}" for layer in layers])
    low = min(
        0.0, *(v for f in fidelity.values() for k, v in f.items() if k.endswith(f"_{metric}") and "baseline" not in k)
    )
    ax.set_ylim(low, 1.08)
    ax.set_ylabel("R² vs mean-token baseline" if metric == "r2" else "mean cosine to teacher")
    ax.set_title("Student fidelity per level")
    return _finish(fig, ax, path)


MAX_CLASS_BARS = 40


def plot_per_class(
    per_class: dict[str, list[float | None]], title: str, path: str | Path, class_names: list[str] | None = None
) -> Path:
    """Top-1 accuracy per class, student beside teacher: one bar pair per class up to ``MAX_CLASS_BARS`` classes,
    else the distribution of per-class accuracies (a histogram stays readable for 1,000+ classes)."""
    path = Path(path)
    classes = len(per_class["student"])
    if classes > MAX_CLASS_BARS:
        return _per_class_histogram(per_class, title, path)
    fig, ax = _figure(max(5, 0.45 * classes + 2), 3.8)
    width = 0.4
    for offset, who in ((-width / 2, "student"), (width / 2, "teacher")):
        values = per_class[who]
        ax.bar([i + offset for i in range(classes)], [v or 0.0 for v in values], width, label=who)
        for i in (i for i, v in enumerate(values) if v is None):  # a class absent from the samples
            ax.text(i + offset, 0.02, MISSING, ha="center", fontsize=8)
    names = class_names if class_names and len(class_names) == classes else [str(i) for i in range(classes)]
    ax.set_xticks(range(classes), names, rotation=45 if classes > 12 else 0, fontsize=7 if classes > 12 else 9)
    ax.set_ylim(0, 1.18)  # headroom: the legend sits above the bars, never on them
    ax.set_ylabel("top-1 accuracy")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    return _finish(fig, ax, path, legend=None)


def _per_class_histogram(per_class: dict[str, list[float | None]], title: str, path: Path) -> Path:
    fig, ax = _figure(6, 3.8)
    bins = [i / 20 for i in range(21)]
    for who in ("student", "teacher"):
        values = [v for v in per_class[who] if v is not None]  # None: a class absent from the samples
        ax.hist(values, bins=bins, alpha=0.55, label=f"{who} ({len(values)} classes)")
    ax.set_xlabel("per-class top-1 accuracy")
    ax.set_ylabel("classes")
    ax.set_title(title)
    return _finish(fig, ax, path)
