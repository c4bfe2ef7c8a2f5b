"""Plots and small reports written next to results (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_losses(records: list[dict[str, Any]], path: str | Path) -> Path:
    """Total, per-level and rgb loss against step (log scale) as a PNG."""
    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    steps = [r["step"] for r in records]
    keys = ["loss"] + sorted({k for r in records for k in r if k.startswith("loss_level_")}) + (["loss_rgb"] if any("loss_rgb" in r for r in records) else [])
    for key in keys:
        label = "total" if key == "loss" else key.replace("loss_level_", "level ").replace("loss_rgb", "rgb")
        ax.plot(steps, [r.get(key, float("nan")) for r in records], label=label, linewidth=2 if key == "loss" else 1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("APM student distillation loss")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
