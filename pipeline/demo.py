"""``apmpipe demo``: the whole pipeline offline on bundled real images, ending in a report folder.

scikit-learn's 1,797 labelled digits are written as WebDataset train/val shards, a small timm ViT is the
teacher (pretrained when the hub is reachable, else a seeded random init, said in one line and in the
report), then extract -> train -> eval (fidelity, teacher head, k-NN, probe, a short TTT) -> islands.
"""
from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.evaluate import EvalConfig, evaluate
from stages.extract import ExtractConfig, ExtractSummary, extract, teacher_for
from stages.islands import islands
from stages.teacher import TeacherConfig
from stages.train import TrainConfig, TrainSummary, train
from storage.checkpoint import RunDir
from storage.errors import ModelError

from .console import ExtractProgress, TrainProgress, err_console, human_bytes
from .datasets import write_digit_shards
from .report import plot_fidelity, plot_losses, plot_per_class

TEACHER = "vit_tiny_patch16_224"
HUB = ("huggingface.co", 443)


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of one demo run."""

    train_images: int
    val_images: int
    image_size: int
    epochs: int
    ttt_samples: int
    preset: str

    @classmethod
    def of(cls, quick: bool) -> "DemoPlan":
        if quick:
            return cls(train_images=320, val_images=128, image_size=64, epochs=4, ttt_samples=4, preset="tiny")
        return cls(train_images=1297, val_images=500, image_size=64, epochs=25, ttt_samples=20, preset="small")


def hub_reachable(timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection(HUB, timeout=timeout):
            return True
    except OSError:
        return False


def _extract_config(shards: list[str], out: Path, teacher: TeacherConfig) -> ExtractConfig:
    return ExtractConfig(inputs=tuple(shards), out=str(out), teacher=teacher, layers=(4, 8, 12), batch_size=64, loader_workers=1, chunk_samples=16, shard_samples=128)


def _extract(shards: list[str], out: Path, teacher: TeacherConfig) -> ExtractSummary:
    config = _extract_config(shards, out, teacher)
    with ExtractProgress() as progress:
        return extract(config, progress=progress, on_plan=progress.plan)


def _teacher(image_size: int, seed: int) -> tuple[TeacherConfig, str]:
    kwargs = (("img_size", image_size), ("num_classes", 10))
    if hub_reachable():
        pretrained = TeacherConfig(TEACHER, pretrained=True, model_kwargs=kwargs, seed=seed)
        try:  # the teacher extraction will use (built once per process): no second download or build
            teacher_for(_extract_config(["probe"], Path("probe"), pretrained))
            return pretrained, f"{TEACHER} with pretrained weights (ImageNet head replaced by a 10-class head)"
        except ModelError as exc:
            err_console.print(f"demo: {exc}; continuing with a random-init teacher", highlight=False, markup=False)
    else:
        err_console.print("demo: the model hub is unreachable (offline), so the teacher is a seeded random-init ViT", highlight=False)
    return TeacherConfig(TEACHER, pretrained=False, model_kwargs=kwargs, seed=seed), f"{TEACHER}, random init (seed {seed}): no pretrained weights offline"


def run_demo(out: Path, quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """Run the demo into ``out``; returns the summary written to ``out/summary.json``."""
    plan = DemoPlan.of(quick)
    out.mkdir(parents=True, exist_ok=True)
    train_shards = write_digit_shards(out / "data", prefix="train", count=plan.train_images, per_shard=128, size=plan.image_size)
    val_shards = write_digit_shards(out / "data", prefix="val", count=plan.val_images, start=plan.train_images, per_shard=128, size=plan.image_size)
    teacher, teacher_note = _teacher(plan.image_size, seed)
    err_console.print(f"[bold]1/4 extract[/bold] teacher {teacher_note}")
    train_summary = _extract(train_shards, out / "cache" / "train.zarr", teacher)
    val_summary = _extract(val_shards, out / "cache" / "val.zarr", teacher)
    err_console.print("[bold]2/4 train[/bold] the APM student from the cache")
    run_dir = out / "student"
    config = TrainConfig(caches=(str(out / "cache" / "train.zarr"),), out=str(run_dir), preset=plan.preset, epochs=plan.epochs, batch_size=32,
                         lr=2e-3, warmup_steps=20, window_samples=256, loader_workers=1, checkpoint_every=10_000, log_every=5, seed=seed, resume=RunDir(run_dir).has_checkpoint())
    with TrainProgress() as progress:
        trained = train(config, on_step=progress.step, on_start=lambda model, total: progress.start(total, 0))
    records = RunDir(run_dir).read_metrics()
    plot_losses(records, out / "loss.png")
    err_console.print("[bold]3/4 eval[/bold] fidelity, classification beside the teacher, test-time training")
    report = evaluate(EvalConfig(cache=str(out / "cache" / "val.zarr"), student=str(run_dir), train_cache=str(out / "cache" / "train.zarr"),
                                 ttt_steps=10, ttt_lr=1e-3, ttt_samples=plan.ttt_samples, seed=seed))
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    plot_fidelity(report["fidelity"], out / "fidelity.png")
    for key, result in report["classification"].items():
        if isinstance(result, dict):
            plot_per_class(result["per_class"], f"{result['method']}: per-class top-1", out / f"per_class_{key}.png")
    err_console.print("[bold]4/4 islands[/bold] of agreement")
    pictures = islands(str(run_dir), [str(out / "cache" / "val.zarr")], str(out / "islands.png"), images=4, panel=128)
    summary = {
        "teacher": teacher_note, "pretrained": teacher.pretrained, "quick": quick,
        "extract": {"train_images": train_summary.images, "val_images": val_summary.images, "stored_bytes": train_summary.stored_bytes + val_summary.stored_bytes,
                    "images_per_s": train_summary.images_per_second},
        "train": {"steps": trained.steps, "first_loss": records[0]["loss"], "last_loss": records[-1]["loss"], "seconds": trained.seconds,
                  "params": trained.params, "flops_per_image": trained.flops_per_image},
        "eval": report, "islands": pictures.path,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "report.md").write_text(render_report(summary, out))
    return summary


def _classification_rows(report: dict[str, Any]) -> list[str]:
    rows = []
    for result in report["classification"].values():
        if isinstance(result, dict):
            s, t = result["student"], result["teacher"]
            rows.append(f"| {result['method']} | {s['top1']:.3f} | {s['top5']:.3f} | {t['top1']:.3f} | {t['top5']:.3f} | {result['agreement']:.3f} |")
    return rows


def render_report(summary: dict[str, Any], out: Path) -> str:
    """The demo's report.md: tables and the pictures, readable on GitHub or any Markdown viewer."""
    ev, tr, ex = summary["eval"], summary["train"], summary["extract"]
    fidelity = "\n".join(f"| {layer} | {f['patch_cosine']:.4f} | {f['patch_mse']:.4g} | {f.get('prefix_cosine', float('nan')):.4f} |" for layer, f in ev["fidelity"].items())
    ttt = ev.get("ttt", {})
    extras = sorted(p.name for p in out.glob("per_class_*.png"))
    lines = [
        "# apmpipe demo report", "",
        f"Teacher: **{summary['teacher']}**. Data: scikit-learn digits (real, labelled), {ex['train_images']} train / {ex['val_images']} val images as WebDataset shards.", "",
        "## Stage one: feature cache", "",
        f"{ex['train_images'] + ex['val_images']} images extracted once at {ex['images_per_s']:.1f} img/s; {human_bytes(ex['stored_bytes'])} on disk (layers 4, 8, 12, float16 + zstd).", "",
        "## Stage two: the APM student", "",
        f"{tr['params'] / 1e6:.2f} M parameters, {tr['flops_per_image'] / 1e9:.3f} GFLOPs per image (all locations). {tr['steps']} steps in {tr['seconds']:.1f} s; "
        f"loss {tr['first_loss']:.4f} -> {tr['last_loss']:.4f}.", "",
        "![loss curve](loss.png)", "",
        "## Fidelity to the teacher (validation)", "",
        "| level | patch cosine | patch MSE | CLS cosine |", "|---|---|---|---|", fidelity, "",
        "![fidelity](fidelity.png)", "",
        "## Classification beside the teacher", "",
        "| method | student top-1 | student top-5 | teacher top-1 | teacher top-5 | agreement |", "|---|---|---|---|---|---|", *_classification_rows(ev), "",
        *[f"![{name}]({name})" for name in extras], "",
    ]
    if ttt:
        lines += ["## Test-time training", "",
                  f"{ttt['samples']} samples, {ttt['steps']} steps each from the {ttt['start']} student (reset per sample): "
                  f"distillation loss {ttt['loss_before']:.4f} -> {ttt['loss_after']:.4f}, {ttt['ms_per_sample']:.1f} ms per sample.", ""]
    lines += ["## Islands of agreement", "", "Rows: validation images. Columns: the image, then student and teacher tokens per level, "
              "projected to RGB with one PCA per level and image (equal colours = equal directions).", "", "![islands](islands.png)", ""]
    if not summary["pretrained"]:
        lines += ["> The teacher is randomly initialised (no network), so its head's accuracy is chance; k-NN and the probe show "
                  "what its features still carry. With network, the demo uses pretrained weights.", ""]
    return "\n".join(lines)
