"""apmpipe demo --quick end to end: every report artifact exists and its numbers are sane."""
from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image

from .conftest import run_cli


def test_demo_quick_writes_a_sane_report(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = run_cli("demo", "--quick", "--out", out)
    assert result.exit_code == 0, result.output
    for name in ("report.md", "summary.json", "eval.json", "loss.png", "fidelity.png", "islands.png", "per_class_knn.png", "per_class_teacher_head.png"):
        assert (out / name).stat().st_size > 0, name
    for png in out.glob("*.png"):
        with Image.open(png) as image:
            assert image.format == "PNG" and min(image.size) > 50
    summary = json.loads((out / "summary.json").read_text())
    assert summary["extract"]["train_images"] == 320 and summary["extract"]["val_images"] == 128
    assert summary["train"]["last_loss"] < 0.8 * summary["train"]["first_loss"]
    fidelity = summary["eval"]["fidelity"]
    assert set(fidelity) == {"4", "8", "12"} and all(f["patch_cosine"] > 0.2 for f in fidelity.values())
    knn = summary["eval"]["classification"]["knn"]
    assert knn["teacher"]["top1"] > 0.3 and knn["student"]["top1"] > 0.2
    ttt = summary["eval"]["ttt"]
    assert ttt["loss_after"] < ttt["loss_before"] and not math.isnan(ttt["ms_per_sample"])
    report = (out / "report.md").read_text()
    assert "![islands](islands.png)" in report and "random init" in report and "| weighted k-NN" in report
    # rerunning the same command finishes (caches complete, run resumed) without redoing the work
    again = run_cli("demo", "--quick", "--out", out)
    assert again.exit_code == 0, again.output
