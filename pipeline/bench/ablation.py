"""``apmpipe bench ablation``: each training objective switched off in turn on the demo's trained teacher."""

from __future__ import annotations

from pathlib import Path

from .runs import ONE_VIEW, AblationRow, selected, train_and_evaluate

ABLATIONS: dict[str, dict[str, object]] = {
    "defaults": {},
    "32 images and 16 locations a step, the previous defaults (--batch-size 32 --locations 16)": {
        "batch_size": 32,
        "locations": 16,
    },
    "paper query (--query paper)": {"query": "paper"},
    "MLP trunk and fixed codes, the previous defaults (--trunk mlp --pos-code fixed)": {
        "trunk": "mlp",
        "pos_code": "fixed",
    },
    "one linear filter with 16 channels (--filter-layers 1 --trigger-channels 16)": {
        "filter_layers": 1,
        "trigger_channels": 16,
    },
    "no cell mixer: T every cell's filter output side by side, the previous default (--mixer-blocks 0)": {
        "mixer_blocks": 0
    },
    "T also carries 8 channels of every cell beside the mixed cells' mean (--trigger-cells 8)": {"trigger_cells": 8},
    "dropout 0.1 inside the mixer while training (--mixer-dropout 0.1)": {"mixer_dropout": 0.1},
    "no KL through the head (--logit-weight 0)": {"logit_weight": 0.0},
    "no target standardisation (--no-standardize)": {"standardize": False},
    "no extra prefix weight (--prefix-weight 0)": {"prefix_weight": 0.0},
    "no pixel loss (--rgb-weight 0)": {"rgb_weight": 0.0},
    "data echoing (--echo 8: 8x fewer bytes read per step)": {"echo": 8},
    "augment: flip (--augment flip)": {"augment": ("flip",)},
    "augment: crop (--augment crop)": {"augment": ("crop",)},
    "augment: flip and crop (--augment flip,crop)": {"augment": ("flip", "crop")},
    "augment: milder crop (--augment crop --crop-scale 0.5,1)": {"augment": ("crop",), "crop_scale": (0.5, 1.0)},
    "one view per image (the train cache extracted without --views)": {},
    "old defaults (MSE only, all locations, lr 5e-4, batch 64, rgb 1)": {
        "logit_weight": 0.0,
        "standardize": False,
        "prefix_weight": 0.0,
        "rgb_weight": 1.0,
        "locations": 0,
        "lr": 5e-4,
        "batch_size": 64,
    },
}
ABLATION_STORAGE = {  # rows that train on the train split extracted another way (ExtractConfig options)
    "one view per image (the train cache extracted without --views)": ONE_VIEW
}


def bench_ablation(
    workdir: Path, steps: int, seed: int = 0, only: list[str] | None = None
) -> tuple[dict[str, object], list[AblationRow]]:
    """Each objective switched off in turn on the demo's trained teacher: held-out R^2 and teacher-head top-1.

    Every run trains ``steps`` steps (``--min-steps``) from the same seed on the same cache; returns the teacher
    record and one row per run.
    """
    from ..demo import DemoPlan, prepare_digit_caches

    data = prepare_digit_caches(workdir, DemoPlan.of(False, seed), seed)
    rows = []
    for name in selected(list(ABLATIONS), only):
        out = workdir / "runs" / f"ablation-{len(rows)}"
        cache = data.train_variant(**ABLATION_STORAGE[name]) if name in ABLATION_STORAGE else data.train
        rows.append(train_and_evaluate(name, cache, data.val, out, steps, seed, ABLATIONS[name]))
    return data.teacher, rows
