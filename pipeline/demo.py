"""``apmpipe demo``: the whole pipeline offline on bundled real images, ending in a report folder.

The teacher is a small timm model *trained* here (a random teacher's tokens flatter every student): a ViT
(``--teacher-kind vit``, levels on one grid) or a ConvNeXt (``cnn``, levels on three grids), trained once into
``OUT/teacher`` as a ``local-dir:`` folder and reused on reruns. The full ViT demo trains the harder reference
teacher (:meth:`ReferenceRecipe.harder`) on 20,000 digits rendered at 32 px from fonts with random distortions
(:func:`glyph_images`); its caches hold the first 4,000 of those (train) and 500 rendered digits it never saw (val).
``--quick``, and the ConvNeXt always, train on scikit-learn's 1,797 labelled digits, split (seeded) into train/val
(``--quick``: a quarter of the recipe's epochs). Then extract -> train (the defaults of ``apmpipe train``, no
tuning flags) -> eval (fidelity beside the mean-token baseline, teacher head, k-NN, probe, TTT) -> islands, and a
report that names the teacher and its own accuracy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from apmpipe.stages.evaluate import EvalConfig, evaluate
from apmpipe.stages.extract import ExtractConfig, ExtractSummary, extract
from apmpipe.stages.islands import islands
from apmpipe.stages.reference_teacher import (
    RECIPES,
    TRAINING_FILE,
    Recipe,
    ReferenceRecipe,
    train_reference_teacher,
    trained_record,
)
from apmpipe.stages.teacher import TeacherConfig
from apmpipe.stages.train import CPU_BATCH_SIZE, TrainConfig, train
from apmpipe.storage.cache import FeatureCache
from apmpipe.storage.checkpoint import RunDir
from apmpipe.storage.errors import ConfigError

from .console import ShardProgress, TrainProgress, counted, err_console, human_bytes, shown
from .datasets import digit_images, digit_split, glyph_images, write_digit_shards, write_glyph_shards
from .report import plot_losses, report_json, write_eval_report

IMAGE_SIZE = 32
TEACHER_GLYPHS = 20_000  # the harder teacher trains on rendered digits 0 .. 19,999
CACHE_GLYPHS = 4_000  # the train cache: the first of those
HELD_OUT_GLYPHS = 500  # the val cache (and the teacher's val): rendered digits after them
# the harder teacher's train cache stores each image as 4 views, the teacher's own tokens for each (extract --views)
TRAIN_VIEWS: dict[str, Any] = {"views": 4, "view_augment": ("crop",), "view_crop_scale": (0.35, 1.0)}


@dataclass(frozen=True)
class DemoPlan:
    """Data and sizes of one demo run (``quick``: the small digits teacher, shorter, and a capped student run)."""

    teacher: Recipe
    max_steps: int
    ttt_samples: int
    glyphs: bool = False  # rendered digits, else scikit-learn's digits
    views: bool = False  # the train cache holds TRAIN_VIEWS of each image

    @property
    def train_storage(self) -> dict[str, Any]:
        """ExtractConfig options of the train cache beyond the defaults."""
        return dict(TRAIN_VIEWS) if self.views else {}

    @classmethod
    def of(cls, quick: bool, seed: int, teacher_kind: str = "vit") -> DemoPlan:
        """``teacher_kind``: a key of :data:`RECIPES` (``vit``, ``cnn``). The ViT: quick the small teacher, else the
        harder one on rendered digits; the ConvNeXt on scikit-learn's digits (its figures were measured there)."""
        if teacher_kind == "vit" and not quick:
            return cls(teacher=ReferenceRecipe.harder(seed), max_steps=0, ttt_samples=20, glyphs=True, views=True)
        recipe = RECIPES[teacher_kind](seed=seed)
        if quick:
            return cls(teacher=replace(recipe, epochs=recipe.epochs // 4), max_steps=150, ttt_samples=4)
        return cls(teacher=recipe, max_steps=0, ttt_samples=20)


def _teacher_data(
    plan: DemoPlan, seed: int
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], str]:
    """The teacher's (train, val) uint8 images and labels, and a line naming them."""
    if plan.glyphs:
        train = glyph_images(TEACHER_GLYPHS, seed=seed, size=IMAGE_SIZE)
        val = glyph_images(HELD_OUT_GLYPHS, start=TEACHER_GLYPHS, seed=seed, size=IMAGE_SIZE)
        return train, val, f"digits rendered from fonts, seed {seed}: {TEACHER_GLYPHS} train / {HELD_OUT_GLYPHS} val"
    images, labels = digit_images(IMAGE_SIZE, "L")
    pixels = np.stack([np.asarray(image) for image in images])
    train_idx, val_idx = digit_split(seed)
    note = f"scikit-learn digits, seeded split {seed}: {len(train_idx)} train / {len(val_idx)} val"
    return (pixels[train_idx], labels[train_idx]), (pixels[val_idx], labels[val_idx]), note


def _shards(out: Path, plan: DemoPlan, seed: int) -> tuple[list[str], list[str]]:
    """The train and val caches' input shards in ``out/data``."""
    data = out / "data"
    if plan.glyphs:
        return (
            write_glyph_shards(data, prefix="train", count=CACHE_GLYPHS, seed=seed, size=IMAGE_SIZE),
            write_glyph_shards(
                data, prefix="val", count=HELD_OUT_GLYPHS, start=TEACHER_GLYPHS, seed=seed, size=IMAGE_SIZE
            ),
        )
    train_idx, val_idx = digit_split(seed)
    return (
        write_digit_shards(data, prefix="train", indices=train_idx, per_shard=256, size=IMAGE_SIZE),
        write_digit_shards(data, prefix="val", indices=val_idx, per_shard=256, size=IMAGE_SIZE),
    )


def _check_kind(out: Path, recipe: Recipe) -> None:
    """Refuse a demo folder whose teacher is of another architecture (its caches and student belong to that one)."""
    path = out / "teacher" / TRAINING_FILE
    found = json.loads(path.read_text()).get("architecture") if path.is_file() else None
    if found not in (None, recipe.architecture):
        raise ConfigError(
            f"--out {out} holds the demo of a {found} teacher, not --teacher-kind {recipe.kind} "
            f"({recipe.architecture}); pick another --out"
        )


def _teacher_folder(out: Path, plan: DemoPlan, seed: int) -> tuple[Path, dict[str, Any]]:
    """The trained reference teacher in ``out/teacher`` (trained now unless a folder of the same recipe is there)."""
    folder, recipe = out / "teacher", plan.teacher
    record = trained_record(folder, recipe)
    if record is None:
        err_console.print(
            f"demo: no pretrained weights offline, so training a small {recipe.family} teacher on the "
            f"{'rendered digits' if plan.glyphs else 'digits'}' train split ({counted(recipe.epochs, 'epoch')})",
            highlight=False,
        )
        train_data, val_data, note = _teacher_data(plan, seed)
        with TrainProgress("teacher") as progress:
            record = train_reference_teacher(
                folder, train_data, val_data, recipe, data_note=note, on_step=progress.step
            )
    err_console.print(
        f"demo: teacher {folder} (trained in {record['seconds']:.0f} s; val top-1 {record['val_top1']:.3f})",
        highlight=False,
    )
    return folder, record


def _extract(shards: list[str], out: Path, teacher: Path, layers: tuple[int, ...], **storage: Any) -> ExtractSummary:
    """The teacher's ``layers`` over ``shards`` into cache ``out``; ``storage``: ExtractConfig storage options
    (``dtype``, ``rank``, ``pixel_codec``, ``views``: one unless given, the demo's figures were measured so)."""
    config = ExtractConfig(
        inputs=tuple(shards),
        out=str(out),
        teacher=TeacherConfig(f"local-dir:{teacher}", pretrained=True),
        layers=layers,
        batch_size=64,
        loader_workers=1,
        chunk_samples=16,
        shard_samples=128,
        **{"views": 1, **storage},
    )
    with ShardProgress() as progress:
        return extract(config, progress=progress, on_plan=progress.plan)


def _previous(out: Path) -> dict[str, Any]:
    """The summary of an earlier run in ``out`` (its figures are kept when a rerun finds the work done)."""
    path = out / "summary.json"
    return json.loads(path.read_text()) if path.exists() else {}


@dataclass(frozen=True)
class DigitCaches:
    """The demo's trained teacher (its record, folder, description and cached ``layers``) and its train/val caches
    (made or reused)."""

    train: str
    val: str
    teacher: dict[str, Any]
    extracted: tuple[ExtractSummary, ExtractSummary]
    train_shards: tuple[str, ...]
    layers: tuple[int, ...]
    train_storage: dict[str, Any]

    def train_variant(self, **storage: Any) -> str:
        """The train split in another storage form (``dtype``, ``rank``, ``views``, ...: over the train cache's own)
        beside the default cache; made once."""
        storage = {**self.train_storage, **storage}
        name = "-".join(f"{key}-{_word(value)}" for key, value in sorted(storage.items())) or "default"
        out = Path(self.train).parent / f"train-{name}.zarr"
        _extract(list(self.train_shards), out, Path(self.teacher["folder"]), self.layers, **storage)
        return str(out)


def _word(value: Any) -> str:
    """An option's value as part of a folder name (``crop,flip`` for a tuple)."""
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def prepare_digit_caches(out: Path, plan: DemoPlan, seed: int) -> DigitCaches:
    """Image shards, the trained reference teacher and its caches in ``out`` (each step reused when already done)."""
    recipe = plan.teacher
    _check_kind(out, recipe)
    out.mkdir(parents=True, exist_ok=True)
    train_shards, val_shards = _shards(out, plan, seed)
    folder, record = _teacher_folder(out, plan, seed)
    layers = recipe.layers
    err_console.print(
        f"[bold]1/4 extract[/bold] the teacher's tokens (layers {_listed(layers)}), pixels and logits, once"
    )
    caches = out / "cache" / "train.zarr", out / "cache" / "val.zarr"
    summaries = (
        _extract(train_shards, caches[0], folder, layers, **plan.train_storage),
        _extract(val_shards, caches[1], folder, layers),
    )
    grids = [f"{h}x{w}" for h, w in (level.grid for level in FeatureCache.open(str(caches[0])).spec.levels)]
    teacher = {
        **record,
        "folder": str(folder),
        "family": recipe.family,
        "description": recipe.describe(),
        "layers": list(layers),
        "grids": grids,
    }
    return DigitCaches(
        str(caches[0]), str(caches[1]), teacher, summaries, tuple(train_shards), layers, plan.train_storage
    )


def _listed(layers: Any) -> str:
    return ", ".join(map(str, layers))


def run_demo(out: Path, quick: bool = False, seed: int = 0, teacher_kind: str = "vit") -> dict[str, Any]:
    """Run the demo into ``out`` with the reference teacher of ``teacher_kind`` (``vit``, ``cnn``); returns the
    summary written to ``out/summary.json``."""
    plan = DemoPlan.of(quick, seed, teacher_kind)
    previous = _previous(out)
    data = prepare_digit_caches(out, plan, seed)
    train_summary, val_summary = data.extracted
    err_console.print("[bold]2/4 train[/bold] the APM student from the cache (apmpipe train defaults)")
    run_dir = out / "student"
    config = TrainConfig(
        caches=(data.train,),
        out=str(run_dir),
        max_steps=plan.max_steps,
        batch_size=CPU_BATCH_SIZE,  # the batch the defaults were chosen at, on any device (CUDA's fills one step)
        loader_workers=1,
        seed=seed,
        resume=RunDir(run_dir).has_checkpoint(),
    )
    with TrainProgress() as progress:
        trained = train(
            config,
            on_step=progress.step,
            on_start=lambda model, total: progress.start(total),
            on_resume=lambda step, total: progress.resumed(step, total, str(run_dir)),
        )
    records = RunDir(run_dir).read_metrics()
    plot_losses(records, out / "loss.png")
    err_console.print(
        "[bold]3/4 eval[/bold] fidelity beside the mean token, classification beside the teacher, test-time training"
    )
    report = evaluate(
        EvalConfig(
            cache=data.val,
            student=str(run_dir),
            train_cache=data.train,
            ttt_steps=10,
            ttt_lr=1e-3,
            ttt_locations=16,
            ttt_samples=plan.ttt_samples,
            seed=seed,
        )
    )
    write_eval_report(report, out)
    err_console.print("[bold]4/4 islands[/bold] of agreement")
    pictures = islands(str(run_dir), [data.val], str(out / "islands.png"), images=4, panel=128)
    fresh_extract = train_summary.images + val_summary.images > 0
    summary = {
        "teacher": data.teacher,
        "quick": quick,
        "extract": {
            "train_images": train_summary.cache_samples // data.train_storage.get("views", 1),
            "train_views": data.train_storage.get("views", 1),
            "val_images": val_summary.cache_samples,
            "stored_bytes": train_summary.stored_bytes + val_summary.stored_bytes,
            "images_per_s": train_summary.images_per_second,
        }
        if fresh_extract or "extract" not in previous
        else previous["extract"],
        "train": {
            "steps": trained.steps,
            "first_loss": records[0]["loss"],
            "last_loss": records[-1]["loss"],
            "seconds": trained.seconds,
            "params": trained.params,
            "flops_per_image": trained.flops_per_image,
            "options": trained.options,
        }
        if trained.samples or "train" not in previous
        else previous["train"],
        "eval": report,
        "islands": pictures.path,
    }
    (out / "summary.json").write_text(report_json(summary))
    (out / "report.md").write_text(render_report(summary, out))
    return summary


def _views_note(views: int) -> str:
    """How the train cache stores its images, for the report (nothing for one view each)."""
    if views == 1:
        return ""
    crop = TRAIN_VIEWS["view_crop_scale"]
    return (
        f" (each as {views} views: the image and {views - 1} random crops of {crop[0]:g}-{crop[1]:g} of its area, "
        "with the teacher's tokens and logits for each, `extract --views`)"
    )


def _classification_rows(report: dict[str, Any]) -> list[str]:
    rows = []
    for result in report["classification"].values():
        if isinstance(result, dict) and "labels_unrelated" in result:
            unrelated = "labels are not the head's classes"
            rows.append(f"| {result['method']} | - | - | {unrelated} | {result['agreement']:.3f} |")
        elif isinstance(result, dict):
            s, t = result["student"], result["teacher"]
            rows.append(
                f"| {result['method']} | {s['top1']:.3f} | {t['top1']:.3f} | "
                f"{s['top1'] / max(t['top1'], 1e-9):.3f}x | {result['agreement']:.3f} |"
            )
    return rows


def _fidelity_rows(fidelity: dict[str, dict[str, float]]) -> list[str]:
    rows = []
    for layer, f in fidelity.items():
        for part in ("prefix", "patch"):
            if f"{part}_cosine" in f:
                rows.append(
                    f"| {layer} | {part} | {shown(f[part + '_cosine'])} | {shown(f.get(part + '_baseline_cosine'))} | "
                    f"{shown(f[part + '_mse'], '.4g')} | {shown(f.get(part + '_baseline_mse'), '.4g')} | "
                    f"{shown(f.get(part + '_r2'))} |"
                )
    return rows


def _ttt_lines(ttt: dict[str, Any]) -> list[str]:
    if not ttt:
        return []
    lines = [
        "## Test-time training",
        "",
        f"{counted(ttt['samples'], 'validation sample')}, each: start from the trained student, "
        f"{counted(ttt['steps'], 'step')} "
        f"(lr {ttt['lr']}, {ttt['locations']} "
        f"locations) on that sample's cached tokens and logits, measure, reset. {ttt['ms_per_step']:.1f} "
        "ms per adaptation step "
        f"({counted(ttt['threads'], 'thread')}).",
        "",
        "| | before | after |",
        "|---|---|---|",
        f"| objective on the sample | {ttt['loss_before']:.4f} | {ttt['loss_after']:.4f} |",
    ]
    last = list(ttt["fidelity_after"])[-1]
    for part in ("prefix", "patch"):
        key = f"{part}_r2"
        if key in ttt["fidelity_after"][last]:
            lines.append(
                f"| R² level {last}, {part} | {ttt['fidelity_before'][last][key]:.3f} | "
                f"{ttt['fidelity_after'][last][key]:.3f} |"
            )
    for name in ("head", "knn"):
        if f"{name}_before" in ttt:
            lines.append(
                f"| {'teacher-head' if name == 'head' else 'k-NN'} top-1 | "
                f"{shown(ttt[name + '_before'].get('top1'))} | {shown(ttt[name + '_after'].get('top1'))} |"
            )
    if "top1" in ttt.get("teacher_head", {}):
        lines.append(
            f"| teacher top-1 (same samples) | {ttt['teacher_head']['top1']:.3f} | {ttt['teacher_head']['top1']:.3f} |"
        )
    return lines + [""]


def _extract_rate(images_per_s: float) -> str:
    """How fast the caches were made (a rerun that found them made, with no earlier summary, did not time it)."""
    return f"at {images_per_s:.1f} img/s" if images_per_s else "(by an earlier run in this folder)"


def render_report(summary: dict[str, Any], out: Path) -> str:
    """The demo's report.md: what was run, the figures beside their baselines, and how to read them."""
    ev, tr, ex, te = summary["eval"], summary["train"], summary["extract"], summary["teacher"]
    extras = sorted(p.name for p in out.glob("per_class_*.png"))
    options = tr.get("options", {})
    lines = [
        "# apmpipe demo report",
        "",
        f"**Teacher**: a timm {te['family']} ({te['architecture']}: {te['description']}, "
        f"{te['recipe']['image_size']} px grayscale) trained offline by the demo on {te['data']} "
        f"in {te['seconds']:.0f} s: **val top-1 {te['val_top1']:.3f}** (train {te['train_top1']:.3f}). "
        f"Saved as `local-dir:{te['folder']}`.",
        "",
        "## Stage one: feature cache",
        "",
        f"{ex['train_images']} train{_views_note(ex.get('train_views', 1))} + {ex['val_images']} val images "
        f"extracted once {_extract_rate(ex['images_per_s'])}; {human_bytes(ex['stored_bytes'])} "
        "on disk (layers by grid: "
        + ", ".join(f"{layer} ({grid})" for layer, grid in zip(te["layers"], te["grids"], strict=True))
        + "; float16 tokens, bit-shuffled LZ4; pixels, labels and logits: zstd).",
        "",
        "## Stage two: the APM student",
        "",
        f"{tr['params'] / 1e6:.2f} M parameters, {tr['flops_per_image'] / 1e9:.3f} GFLOPs per image (all "
        f"locations). {tr['steps']} steps "
        f"(batch {options.get('batch_size', '?')}, lr {options.get('lr', float('nan')):.3g}, "
        f"{options.get('locations', '?')} locations + prefix tokens per image) "
        f"in {tr['seconds']:.1f} s; loss {tr['first_loss']:.4f} -> {tr['last_loss']:.4f}. The options are "
        "`apmpipe train`'s defaults.",
        "",
        "![loss curve](loss.png)",
        "",
        "## Fidelity to the teacher (validation)",
        "",
        "Cosine (1 = same direction) and MSE between the student's and the teacher's tokens, beside the "
        "**mean-token baseline**: predicting "
        "every image's token at a location by the training set's mean token there. R² = 1 − MSE(student) "
        "/ MSE(baseline) is the share of the "
        "input-dependent variance the student explains (0: no better than the constant, 1: exact). A "
        "high cosine alone means little: the "
        "baseline's is high too.",
        "",
        "| level | tokens | cosine | baseline cosine | MSE | baseline MSE | R² |",
        "|---|---|---|---|---|---|---|",
        *_fidelity_rows(ev["fidelity"]),
        "",
        "![fidelity](fidelity.png)",
        "",
        "## Classification beside the teacher (same validation samples)",
        "",
        "Teacher head: the student's final-level tokens through the teacher's own norm, pooling and "
        "classifier (stored in the cache). "
        "k-NN and the linear probe fit on global features of the training cache (what the head reads: "
        "its pooled, normed pre-logits).",
        "",
        "| method | student top-1 | teacher top-1 | student / teacher | agreement |",
        "|---|---|---|---|---|",
        *_classification_rows(ev),
        "",
        *[f"![{name}]({name})" for name in extras],
        "",
        *_ttt_lines(ev.get("ttt", {})),
        "## Islands of agreement",
        "",
        "Rows: validation images. Columns: the image, then student and teacher tokens per level, "
        "projected to RGB with one PCA per level and "
        "image: locations with similar colours have similar token directions (an island); the student "
        "should reproduce the teacher's islands.",
        "",
        "![islands](islands.png)",
        "",
    ]
    if summary.get("quick"):
        lines += [
            "> `--quick`: the small teacher on scikit-learn digits and a 150-step student run, for tests; run without "
            "`--quick` for the real figures.",
            "",
        ]
    return "\n".join(lines)
