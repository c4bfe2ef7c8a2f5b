"""Students trained and evaluated on the demo's caches: the rows of ``bench ablation`` and ``bench bytes``."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from .measure import timed


@dataclass
class AblationRow:
    name: str
    options: dict[str, object]
    fidelity: dict[str, dict[str, float]]
    head: dict[str, object]
    seconds: float


def train_and_evaluate(
    name: str, cache: str, val: str, out: Path, steps: int, seed: int, options: dict[str, object]
) -> AblationRow:
    """Train ``steps`` steps on ``cache`` with ``options`` (fresh run in ``out``), evaluate on ``val``."""
    from apmpipe.stages.evaluate import EvalConfig, evaluate
    from apmpipe.stages.train import CPU_BATCH_SIZE, TrainConfig, train

    shutil.rmtree(out, ignore_errors=True)
    defaults = {"caches": (cache,), "out": str(out), "min_steps": steps, "loader_workers": 1, "seed": seed}
    # the batch the defaults were chosen at, on any device (CUDA's default would give a digits cache 1 step an epoch)
    config = TrainConfig.from_options({**defaults, "batch_size": CPU_BATCH_SIZE, **options})
    seconds = timed(lambda: train(config))
    report = evaluate(EvalConfig(cache=val, student=str(out), seed=seed))
    return AblationRow(name, options, report["fidelity"], report["classification"].get("teacher_head", {}), seconds)


def selected(names: list[str], only: list[str] | None) -> list[str]:
    """The names holding any word of ``only`` (all names without it)."""
    return [name for name in names if not only or any(word in name for word in only)]


# the train split stored one view per image (ExtractConfig options over the demo's train cache, which holds views)
ONE_VIEW = {"views": 1, "view_augment": ()}
