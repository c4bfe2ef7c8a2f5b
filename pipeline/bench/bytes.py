"""``apmpipe bench bytes``: bytes read per trained sample against held-out fidelity, on the demo's trained teacher."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .measure import bench_progress, read_bytes_per_sample
from .runs import CROP_VIEWS, AblationRow, selected, train_and_evaluate

if TYPE_CHECKING:
    from ..demo import DigitCaches

LEVELS = "{levels}"  # in a plan's name: its --levels, resolved against the cache


@dataclass(frozen=True)
class BytePlan:
    """How one run reads less: the train cache's storage (ExtractConfig ``dtype``, ``rank``), ``--echo``,
    ``--levels`` (negative: counted from the cache's last level, -1 = last)."""

    storage: dict[str, object] = field(default_factory=dict)
    echo: int = 1
    levels: tuple[int, ...] | None = None
    train: dict[str, object] = field(default_factory=dict)  # other train options (--augment)

    def options(self) -> dict[str, object]:
        return {"echo": self.echo} | ({"levels": self.levels} if self.levels else {}) | self.train

    def for_layers(self, cached: tuple[int, ...]) -> BytePlan:
        """This plan with its negative ``levels`` resolved against the ``cached`` layers."""
        if not self.levels:
            return self
        return replace(self, levels=tuple(cached[level] if level < 0 else level for level in self.levels))


# the first plan is the baseline every row is compared to
BYTE_PLANS: dict[str, BytePlan] = {
    "float16 cache, all levels (default)": BytePlan(),
    "float16, --codec zstd (the earlier default)": BytePlan({"codec": "zstd"}),
    "int8 cache": BytePlan({"dtype": "int8"}),
    "float16, --echo 8": BytePlan(echo=8),
    "int8, --echo 8": BytePlan({"dtype": "int8"}, echo=8),
    "int8, --echo 16": BytePlan({"dtype": "int8"}, echo=16),
    "int8 rank 32, --echo 8": BytePlan({"dtype": "int8", "rank": 32}, echo=8),
    f"int8, --levels {LEVELS}, --echo 4": BytePlan({"dtype": "int8"}, echo=4, levels=(-1,)),  # the last level
    "int8, --augment crop --crop-scale 0.5,1 (resampled targets)": BytePlan(
        {"dtype": "int8"}, train={"augment": ("crop",), "crop_scale": (0.5, 1.0)}
    ),
    "int8, --views 4 --view-augment crop --view-crop-scale 0.5,1 (the teacher's own views)": BytePlan(
        {"dtype": "int8", **CROP_VIEWS}
    ),
    "int8 rank 32, --views 4 --view-augment crop --view-crop-scale 0.5,1": BytePlan(
        {"dtype": "int8", "rank": 32, **CROP_VIEWS}
    ),
}
BYTES_TARGET = 1 / 8  # of the default's bytes read per trained sample
COSINE_TOLERANCE = 0.005  # patch cosine, every trained level, vs the default
TOP1_TOLERANCE = 0.005  # teacher-head top-1 vs the default


def plans_for(cached: tuple[int, ...]) -> dict[str, BytePlan]:
    """:data:`BYTE_PLANS` resolved against a cache of the ``cached`` layers, in their names too."""
    plans = {}
    for name, plan in BYTE_PLANS.items():
        resolved = plan.for_layers(cached)
        plans[name.replace(LEVELS, ",".join(map(str, resolved.levels or ())))] = resolved
    return plans


@dataclass
class BytesRow:
    run: AblationRow
    bytes_per_trained_sample: float

    def patch_cosines(self) -> dict[str, float]:
        return {layer: f["patch_cosine"] for layer, f in self.run.fidelity.items()}

    def top1(self) -> float:
        return float(self.run.head.get("student", {}).get("top1", float("nan")))

    def meets_bar(self, baseline: BytesRow) -> bool:
        """At most 1/8 of the baseline's bytes, patch cosine within 0.005 on every level it trains, top-1 +-0.5 pt."""
        base = baseline.patch_cosines()
        return (
            self.bytes_per_trained_sample <= BYTES_TARGET * baseline.bytes_per_trained_sample
            and all(abs(cos - base[layer]) <= COSINE_TOLERANCE for layer, cos in self.patch_cosines().items())
            and abs(self.top1() - baseline.top1()) <= TOP1_TOLERANCE
        )


def bench_bytes(
    workdir: Path, steps: int, seed: int = 0, only: list[str] | None = None
) -> tuple[dict[str, object], list[BytesRow]]:
    """Bytes read per trained sample against held-out fidelity, on the demo's trained teacher.

    Each plan stores the train split its way (float16, int8, low rank) and trains ``steps`` steps from the same seed
    (echo and ``--levels`` as given); each student is evaluated on the same float16 val cache. The baseline (first
    plan) always runs.
    """
    from ..demo import DemoPlan, prepare_digit_caches

    data = prepare_digit_caches(workdir, DemoPlan.of(False, seed), seed)
    plans = plans_for(data.layers)
    names = list(plans)
    rows = [
        _bytes_row(name, plans[name], data, workdir / "runs" / f"bytes-{index}", steps, seed)
        for index, name in enumerate([names[0], *selected(names[1:], only)])
    ]
    _write_bytes_record(workdir / "bench-bytes.json", data.teacher, steps, rows)
    return data.teacher, rows


def _bytes_row(name: str, plan: BytePlan, data: DigitCaches, out: Path, steps: int, seed: int) -> BytesRow:
    """One plan: its train cache (made once), ``steps`` trained steps, evaluated on ``data.val``, its bytes read."""
    cache = data.train_variant(**plan.storage) if plan.storage else data.train
    bench_progress(f"{name}: training {steps} steps")
    run = train_and_evaluate(name, cache, data.val, out, steps, seed, plan.options())
    stored, _ = read_bytes_per_sample(cache, plan.levels, logits=True)
    return BytesRow(run, stored / plan.echo)


def _write_bytes_record(path: Path, teacher: dict[str, object], steps: int, rows: list[BytesRow]) -> None:
    """What ``bench bytes`` measured, as JSON beside its runs (for tables and regression checks)."""
    from ..report import report_json

    base = rows[0]
    record = {
        "teacher": teacher,
        "steps": steps,
        "rows": [
            {
                "name": row.run.name,
                "options": {k: list(v) if isinstance(v, tuple) else v for k, v in row.run.options.items()},
                "bytes_per_trained_sample": row.bytes_per_trained_sample,
                "bytes_ratio": row.bytes_per_trained_sample / base.bytes_per_trained_sample,
                "patch_cosine": row.patch_cosines(),
                "head_top1": row.top1(),
                "meets_bar": row is not base and row.meets_bar(base),
                "fidelity": row.run.fidelity,
                "seconds": row.run.seconds,
            }
            for row in rows
        ],
    }
    path.write_text(report_json(record))
