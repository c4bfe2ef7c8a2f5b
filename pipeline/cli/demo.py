"""``apmpipe demo``: the whole pipeline offline on bundled digits."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from .. import render
from ..console import out_console
from .options import ApmTyper

app = ApmTyper()


class TeacherKind(StrEnum):  # the keys of stages.reference_teacher.RECIPES (a test checks)
    vit = "vit"
    cnn = "cnn"


@app.command()
def demo(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for data, caches, student and the report.")] = Path(
        "demo-out"
    ),
    quick: Annotated[
        bool,
        typer.Option(
            "--quick",
            help="The small teacher on scikit-learn digits (shorter recipe) and a 150-step student (for tests).",
        ),
    ] = False,
    seed: Annotated[
        int, typer.Option(help="Seed of the train/val split, the teacher, the student and data order.")
    ] = 0,
    teacher_kind: Annotated[
        TeacherKind,
        typer.Option(
            help="The trained teacher: a ViT (blocks 2, 4 on one 8x8 grid; 1, 2 with --quick) or a ConvNeXt "
            "(levels 2, 3, 4 on grids 16x16, 8x8, 4x4; on scikit-learn digits)."
        ),
    ] = TeacherKind.vit,
) -> None:
    """Run the whole pipeline offline on bundled digits.

    Real images (scikit-learn digits), a small trained teacher, and a report folder."""
    from ..demo import run_demo
    from ..report import EVAL_JSON

    summary = run_demo(out, quick=quick, seed=seed, teacher_kind=teacher_kind.value)
    render.eval_report(summary["eval"], out / EVAL_JSON)
    report = out / "report.md"
    out_console.print(f"report: {report} (loss.png, fidelity.png, per-class plots, islands.png)", highlight=False)
