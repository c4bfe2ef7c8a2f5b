"""Terminal tables of each command's result: what ``apmpipe`` prints on stdout (stderr for skipped samples and
failures). Every function takes a stage's result and prints; none computes anything the result lacks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

from apmpipe.stages.extract_config import AUTO_RENDERS, MORE_VIEWS
from apmpipe.storage.redact import redact_url

from .console import counted, err_console, human_bytes, out_console, shown


def table(title: str, rows: list[tuple[str, str]]) -> Table:
    """A two-column key/value table with ``title`` above it."""
    result = Table(title=title, show_header=False, title_justify="left")
    result.add_column(style="bold")
    result.add_column()
    for key, value in rows:
        result.add_row(key, value)
    return result


def _err_line(text: str) -> None:
    err_console.print(text, highlight=False, markup=False, soft_wrap=True)


# -- extract / info / verify ---------------------------------------------------------------------------------
def extract_summary(summary: Any) -> None:
    """``apmpipe extract``: shards, images, bytes, throughput, head and recorded fidelity; skips and failures."""
    done = f"{summary.count('done')} done, {summary.count('skipped')} already complete"
    rows = [
        ("cache", redact_url(summary.cache)),
        ("shards", f"{done}, {summary.count('failed')} failed"),
        ("images", f"{summary.images} written, {len(summary.skipped_samples)} samples skipped"),
        ("views", _views_chosen(summary.views, summary.views_auto)),
        ("on disk", f"{human_bytes(summary.stored_bytes)} in the cache"),
        ("throughput", f"{summary.images_per_second:.1f} img/s over {summary.seconds:.1f} s"),
        ("teacher head", summary.head),
    ]
    if summary.cache_samples:
        per_image = human_bytes(summary.stored_bytes * summary.views / summary.cache_samples)
        rows.insert(5, ("bytes per image", per_image + (f" ({summary.views} views)" if summary.views > 1 else "")))
    for layer, stats in summary.fidelity.items():
        fidelity = f"min cosine {stats['cosine_min']:.5f}, relative MSE {stats['relative_mse']:.2e}"
        rows.append((f"fidelity layer {layer}", fidelity))
    if summary.pixel_psnr is not None:
        rows.append(("pixel fidelity", f"min PSNR {summary.pixel_psnr:.1f} dB"))
    out_console.print(table("apmpipe extract", rows))
    _skips_and_failures(summary, "shard")
    if summary.nothing_stored:
        _err_line(f"error: {summary.nothing_stored}")
    elif summary.few_images:
        _err_line(
            f"warning: {summary.few_images}; to train on this cache, extract it again into another --out with "
            f"{MORE_VIEWS}, the default (a held-out cache wants one view): docs/train.md, 'Few images'"
        )


def counting_images(limit: int) -> None:
    """Before ``extract --views auto`` reads tar shards to count their images (silent otherwise for a while)."""
    _err_line(f"extract: counting the tar shards' images for --views auto (up to {limit:,}; --views N skips this)")


def _views_chosen(views: int, auto: bool) -> str:
    """The views per image an extract run stored, and why when ``--views auto`` chose them."""
    if not auto:
        return f"{views} per image"
    if views == 1:
        return f"1 per image (--views auto: the inputs hold {AUTO_RENDERS:,} images or more)"
    return (
        f"{views} per image, the teacher's own tokens for each (--views auto: the inputs hold under "
        f"{AUTO_RENDERS:,} images); eval and --val score view 0, so a cache only scored on wants --views 1"
    )


def _skips_and_failures(totals: Any, unit: str) -> None:
    """On stderr: the first 20 skipped samples and every failed ``unit`` (shard or part) of a run's totals."""
    for name, key, reason in totals.skipped_samples[:20]:
        _err_line(f"skipped {name}/{key}: {reason}")
    for result in totals.results:
        if result.status == "failed":
            _err_line(f"failed {unit} {result.name}: {result.error}")


def embed_summary(summary: Any) -> None:
    """``apmpipe embed``: parts, images, the feature of each level, the teacher head, throughput; skips, failures."""
    done = f"{summary.count('done')} done, {summary.count('skipped')} already complete"
    head = summary.head
    rate = summary.images / summary.seconds if summary.seconds else 0.0
    bare = summary.images / summary.student_seconds if summary.student_seconds else 0.0
    rows = [
        ("out", redact_url(summary.out)),
        ("parts", f"{done}, {summary.count('failed')} failed"),
        ("images", f"{summary.images} embedded, {len(summary.skipped_samples)} samples skipped"),
        ("levels", ", ".join(f"layer {lv['layer']}: {lv['feature']}" for lv in summary.levels)),
        (
            "teacher head",
            f"logits and top-k classes from {head['cache']} ({head['pool']} pooling)"
            if head["cache"]
            else f"none, embedded without logits: {head['reason']}",
        ),
        ("throughput", f"{rate:.1f} img/s over {summary.seconds:.1f} s (student forward alone: {bare:.1f} img/s)"),
    ]
    out_console.print(table("apmpipe embed", rows))
    _skips_and_failures(summary, "part")


def _samples(samples: int, spec: dict[str, Any]) -> str:
    """The cache's sample count; with ``--views``, its images and how their views were drawn."""
    views = spec.get("views", 1)
    if views == 1:
        return str(samples)
    crop = f", crop scale {spec['view_crop_scale'][0]:g}-{spec['view_crop_scale'][1]:g}" * (
        "crop" in spec["view_augment"]
    )
    return (
        f"{samples} ({samples // views} images x {views} views: the image, then {','.join(spec['view_augment'])}{crop})"
    )


def cache_description(desc: dict[str, Any], sizes: bool) -> None:
    """``apmpipe info``: what :meth:`FeatureCache.describe` returned."""
    spec = desc["spec"]
    teacher, data = spec["teacher"], spec["data_config"]
    low_rank = f" coefficients of rank-{spec['rank']} bases" if spec["rank"] else ""
    levels = ", ".join(
        f"{lv['layer']}: {lv['prefix_tokens']}+{lv['grid'][0]}x{lv['grid'][1]} tokens x {lv['dim']}"
        for lv in spec["levels"]
    )
    storage = (
        f"{spec['dtype']}{low_rank}, codec {spec['codec']}, pixels {spec['pixel_codec']}, "
        f"chunks of {spec['chunk_samples']}, zarr shards of {spec['shard_samples']}"
    )
    shards = desc["shards"]
    if sizes:
        size = (
            f"{human_bytes(desc['stored_bytes'])} on disk, {human_bytes(desc['raw_bytes'])} raw, "
            f"ratio {desc['compression_ratio']:.2f}x, {human_bytes(desc['bytes_per_sample'])}/sample"
        )
    else:
        size = f"{human_bytes(desc['raw_bytes'])} raw (--sizes: bytes on disk)"
    head = desc["head"]
    rows = [
        ("format", desc["format"]),
        ("teacher", f"{teacher['name']} ({teacher['weights']}, sha256 {teacher['weights_sha256'][:12]})"),
        ("input", f"{data['input_size']} {data['interpolation']}, crop {data.get('crop_pct')}, mean {data['mean']}"),
        ("levels", levels),
        ("storage", storage),
        ("shards", f"{shards['complete']} complete, {shards['writing']} incomplete, {shards['failed']} failed"),
        ("samples", _samples(desc["samples"], spec)),
        ("precision", ", ".join(desc["precision"]) or "-"),
        ("size", size),
        ("teacher head", "stored" if head.get("available") else f"none ({head.get('reason', 'unknown')})"),
        ("skipped samples", str(len(desc["skipped_samples"]))),
        *_array_rows(desc["arrays"]),
        *_recorded_fidelity_rows(desc["fidelity"]),
    ]
    out_console.print(table(f"apmpipe cache {desc['url']}", rows))
    for item in desc["skipped_samples"][:20]:
        out_console.print(f"skipped {item['shard']}/{item['key']}: {item['reason']}", highlight=False, markup=False)
    for item in desc["failed_shards"]:
        out_console.print(f"failed shard {item['shard']}: {item['error']}", highlight=False, markup=False)


def _array_rows(arrays: dict[str, dict[str, float]]) -> list[tuple[str, str]]:
    """Bytes per sample of each array: stored (with ``--sizes``) beside the raw (decoded) size, and what a training
    read fetches where whole-shard chunks make that more."""
    rows = []
    for name, sizes in arrays.items():
        raw = f"{human_bytes(sizes['raw_bytes_per_sample'])} raw" if "raw_bytes_per_sample" in sizes else ""
        stored = f"{human_bytes(sizes['stored_bytes_per_sample'])} stored" if "stored_bytes_per_sample" in sizes else ""
        if sizes.get("read_bytes_per_sample", 0.0) > 1.01 * sizes.get("stored_bytes_per_sample", 0.0):
            stored += f", {human_bytes(sizes['read_bytes_per_sample'])} fetched per sample read"
        rows.append((f"bytes/sample {name}", f"{stored} ({raw})" if stored and raw else stored or raw))
    return rows


def _recorded_fidelity_rows(fidelity: dict[str, Any]) -> list[tuple[str, str]]:
    """What extraction recorded of lossy storage: per level, worst cosine and mean relative MSE; pixel PSNR."""
    rows = [
        (
            f"fidelity layer {layer}",
            f"min cosine {f['cosine_min']:.5f}, relative MSE {f['relative_mse']:.2e} ({f['samples']} samples' shards)",
        )
        for layer, f in fidelity["levels"].items()
    ]
    if fidelity["pixels"]:
        rows.append(("pixel fidelity", f"min PSNR {fidelity['pixels']['psnr_db']:.1f} dB"))
    return rows


def verify_report(report: Any) -> None:
    """``apmpipe verify``: per level worst difference beside its tolerance, the logits, the verdict."""
    rows = [
        (
            f"layer {layer}",
            f"max |diff| {s['max_abs']:.3g}, min cosine {s['min_cosine']:.6f} (tolerance >= {s['tolerance']:.6f})",
        )
        for layer, s in report.levels.items()
    ]
    if report.logits_max_abs is not None:
        rows.append(("logits", f"max |diff| {report.logits_max_abs:.3g} (tolerance <= {report.logits_tolerance:.3g})"))
    failures = report.failures
    verdict = f"FAIL: {'; '.join(failures)}" if failures else "PASS: every level and the logits are within tolerance"
    rows.append(("verdict", verdict))
    out_console.print(table(f"apmpipe verify: {report.samples} samples recomputed in {report.precision}", rows))


def integrity_report(report: Any) -> None:
    """``apmpipe verify --integrity``: every damaged chunk, how many were read and checksummed, the verdict."""
    rows = [(f"shards/{d.shard}/{d.array}/{d.chunk}".replace("//", "/"), d.problem) for d in report.damaged]
    rows.append(("chunks", f"{report.chunks} read, {report.checksummed} with checksums (format version 3)"))
    groups = sorted({d.shard for d in report.damaged})
    verdict = (
        f"FAIL: {len(report.damaged)} damaged chunk(s); delete {', '.join(f'shards/{g}' for g in groups)} and rerun "
        "apmpipe extract to rewrite them"
        if groups
        else "PASS: every chunk reads and matches its checksum"
        if report.checksummed == report.chunks
        else f"PASS: every chunk reads ({report.chunks - report.checksummed} written before format version 3 carry no "
        "checksum: their bytes are not checked)"
    )
    rows.append(("verdict", verdict))
    out_console.print(table(f"apmpipe verify --integrity: {len(report.shards)} shard groups", rows))


# -- train ---------------------------------------------------------------------------------------------------
def student_size(model: Any) -> None:
    """The line printed when training starts."""
    flops = model.flops_per_image() / 1e9
    err_console.print(
        f"student: {model.num_params() / 1e6:.2f} M parameters, {flops:.3f} GFLOPs per image (all locations)",
        highlight=False,
    )


def train_stopped(summary: Any, run_dir: str, resume: str) -> None:
    """Ctrl-C / SIGTERM: where the checkpoint is and the command that resumes."""
    import signal

    name = signal.Signals(summary.stopped_by).name
    checkpoints = f"{redact_url(run_dir).rstrip('/')}/checkpoints"
    err_console.print(
        f"{name}: stopped at step {summary.steps}; checkpoint saved in {checkpoints}", highlight=False, soft_wrap=True
    )
    _err_line(f"resume with: {resume}")


def train_summary(summary: Any, loss_plot: str) -> None:
    """``apmpipe train``: the student, steps, loss and throughput."""
    size = f"{summary.params / 1e6:.2f} M params, {summary.flops_per_image / 1e9:.3f} GFLOPs/image"
    rate = f"{summary.samples / summary.seconds:.1f} samples/s over {summary.seconds:.1f} s" if summary.seconds else "-"
    rows = [
        ("run", redact_url(summary.run_dir)),
        ("student", f"{redact_url(summary.student)} ({size})"),
        ("steps", f"{summary.steps} ({summary.epochs_done:.2f} epochs)"),
        ("loss", f"{summary.first_loss:.4f} -> {summary.last_loss:.4f}"),
        ("throughput", rate),
        *([("held-out R2", _held_out_line(summary.held_out))] if summary.held_out else []),
        ("loss curve", redact_url(str(loss_plot))),
    ]
    out_console.print(table("apmpipe train", rows))


def _held_out_line(held_out: dict[str, Any]) -> str:
    """``train --val``: the exported (best) score beside the last, on the mean-token baseline's scale."""
    stopped = ", stopped early (--patience)" if held_out["stopped_early"] else ""
    return (
        f"{held_out['best']:.3f} at step {held_out['best_step']} (exported; last {held_out['last']:.3f}{stopped}; "
        f"mean token 0) on {held_out['cache']}"
    )


# -- eval ----------------------------------------------------------------------------------------------------
def _fidelity_line(f: dict[str, float]) -> str:
    """Cosine and R^2 per token kind, the constant baseline's cosine beside."""
    parts = []
    for part in ("patch", "prefix"):
        if f"{part}_cosine" in f:
            base = ""
            if f"{part}_r2" in f:
                base = f" (mean token {f[part + '_baseline_cosine']:.3f}), R2 {f[part + '_r2']:.3f}"
            parts.append(f"{part} cos {f[part + '_cosine']:.3f}{base}")
    return "; ".join(parts)


def _classification_row(key: str, result: dict[str, Any] | str) -> tuple[str, str]:
    if not isinstance(result, dict):  # why a method did not run
        return key.replace("_", " "), result
    if "labels_unrelated" in result:  # no accuracy to compare: how often the student decides as the teacher does
        return result["method"], (
            f"labels are not the head's classes ({result['labels_unrelated']}): student agrees with the teacher's "
            f"top-1 on {result['agreement']:.3f} of samples"
        )
    s, t = result["student"], result["teacher"]
    ratio = s["top1"] / max(t["top1"], 1e-9)
    return result["method"], (
        f"student top-1 {s['top1']:.3f} ({ratio:.3f}x teacher) | teacher {t['top1']:.3f} | agree "
        f"{result['agreement']:.3f}"
    )


def _ttt_rows(t: dict[str, Any]) -> list[tuple[str, str]]:
    steps = f"{counted(t['samples'], 'sample')} x {counted(t['steps'], 'step')} from {t['start']}"
    rows = [("test-time training", f"{steps}: {t['ms_per_step']:.1f} ms/step ({counted(t['threads'], 'thread')})")]
    last = list(t["fidelity_after"])[-1]
    before, after = _fidelity_line(t["fidelity_before"][last]), _fidelity_line(t["fidelity_after"][last])
    rows.append(("  TTT fidelity, last level", f"before: {before}; after: {after}"))
    for key in ("head", "knn"):
        if f"{key}_before" in t:
            b, a = t[f"{key}_before"], t[f"{key}_after"]
            if "top1" not in b:  # labels that are not the head's classes: agreement with the teacher instead
                rows.append((f"  TTT {key} agreement", f"{b['agreement']:.3f} -> {a['agreement']:.3f}"))
                continue
            teacher = ""
            if key == "head" and "top1" in t.get("teacher_head", {}):
                teacher = f" (teacher {t['teacher_head']['top1']:.3f})"
            rows.append((f"  TTT {key} top-1", f"{shown(b.get('top1'))} -> {shown(a.get('top1'))}{teacher}"))
    if "left_out" in t:
        rows.append(("  TTT classification", t["left_out"]))
    return rows


def eval_report(report: dict[str, Any], json_path: str | Path) -> None:
    """``apmpipe eval`` (and the demo): fidelity, classification beside the teacher, TTT, where the JSON is."""
    rows = [("samples", str(report["samples"]))]
    rows += [(f"fidelity layer {layer}", _fidelity_line(f)) for layer, f in report["fidelity"].items()]
    rows += [_classification_row(key, result) for key, result in report["classification"].items()]
    if "ttt" in report:
        rows += _ttt_rows(report["ttt"])
    if report.get("selected_on_this_cache"):
        step = report["student"]["held_out"]["best_step"]
        rows.append(("note", f"train --val chose these weights (step {step}) by their R2 on this cache, so its figures "
                     "lean optimistic; a cache of other images gives unbiased ones"))  # fmt: skip
    rows.append(("report", redact_url(str(json_path))))
    out_console.print(table("apmpipe eval", rows))


def islands_result(result: Any) -> None:
    """``apmpipe islands``: what was converted (stderr) and what was written."""
    if result.converted:
        _err_line(f"islands: {result.converted}")
    beside = ", student beside teacher" if result.with_teacher else ""
    size = f"{result.width}x{result.height} px, {result.images} images{beside}"
    out_console.print(f"wrote {redact_url(str(result.path))} ({size})", highlight=False)


# -- bench ---------------------------------------------------------------------------------------------------
def bench_extract(result: Any, config: Any) -> None:
    """``apmpipe bench extract``: extraction beside the bare teacher forward."""
    layers = ",".join(map(str, config.layers))
    raw = human_bytes(result.raw_fp32_bytes_per_image)
    rows = [
        ("machine", result.machine),
        ("images", f"{result.images} ({config.teacher.name}, batch {config.batch_size}, layers {layers})"),
        ("bare forward_intermediates", f"{result.forward_ips:.1f} img/s"),
        (
            "apmpipe extract",
            f"{result.extract_ips:.1f} img/s (decode in {result.loader_workers} workers, background writer)",
        ),
        ("ratio extract / forward", f"{result.ratio:.3f} (target >= 0.95)"),
        ("stored bytes / image", f"{human_bytes(result.stored_bytes_per_image)} ({config.dtype}, {config.codec})"),
        ("raw bytes / image (fp32 tokens)", f"{raw}; {result.compression:.2f}x smaller on disk"),
    ]
    out_console.print(table("apmpipe bench extract", rows))


def bench_train(result: Any, options: dict[str, Any]) -> None:
    """``apmpipe bench train``: bytes per trained sample, loader vs student, cached vs online, peak RSS.
    ``options``: the command's (preset, batch_size, echo, locations, loader_workers, dtype, rank, student_rate)."""
    k, echo, rank = f"K={options['locations']}", options["echo"], options["rank"]
    storage = f"layers {options['layers']}, {options['dtype']}{f', rank {rank}' if rank else ''}, {options['codec']}"
    per_loaded = human_bytes(result.bytes_per_sample)
    rows = [
        ("machine", result.machine),
        (
            "setup",
            f"{result.samples} images, teacher {result.teacher} ({storage}), "
            f"student {options['preset']}, batch {options['batch_size']}, echo {echo}",
        ),
        (
            "bytes read / trained sample",
            f"{human_bytes(result.bytes_per_trained_sample)} ({per_loaded} per loaded sample / echo {echo})",
        ),
        (
            "(a) loader",
            f"{result.loader_sps:.1f} samples/s, {options['loader_workers']} workers, "
            f"decoding {result.decode_mb_s_per_worker:.0f} MB/s per worker",
        ),
    ]
    if result.loader_other_sps:
        shipped, rebuilt = (
            (result.loader_sps, result.loader_other_sps)
            if result.rebuilds_on_device
            else (result.loader_other_sps, result.loader_sps)
        )
        rows.append(
            (
                "(a) low-rank tokens",
                f"loader shipping coefficients {shipped:.1f} samples/s vs rebuilding tokens on its CPU "
                f"{rebuilt:.1f}: {shipped / rebuilt:.2f}x (train ships them on a GPU, rebuilds in the loader on a CPU)",
            )
        )
    for label, rate in result.student_sps.items():
        needed = result.loader_needed(rate)
        target = " (target >= 3)" if label == k else ""
        rows.append(
            (
                f"(b) student, {label} locations",
                f"{rate:.1f} trained samples/s, needs {needed:.1f} loaded/s: loader / need "
                f"{result.loader_sps / needed:.2f}x{target}",
            )
        )
    if options["student_rate"]:
        rate = options["student_rate"]
        needed = result.loader_needed(rate)
        read = needed * result.bytes_per_sample / 1e9
        rows.append(
            (
                "loader for --student-rate",
                f"{rate:.0f} samples/s needs {needed:.0f} loaded/s = {read:.2f} GB/s read; "
                f"this loader gives {result.loader_sps / needed:.2f}x of it",
            )
        )
    rows += [
        ("(c) cached (apmpipe train)", f"{result.cached_sps:.1f} trained samples/s (one epoch, {k})"),
        (
            "    online distillation",
            f"{result.online_sps[result.online_batch]:.1f} trained samples/s at its best batch {result.online_batch} "
            f"(tried {', '.join(f'{b}: {r:.1f}/s' for b, r in result.online_sps.items())}; teacher forward every "
            f"loaded batch, {result.online_setup}, {k})",
        ),
        ("cached / online", f"{result.cached_speedup:.2f}x (target >= 5)"),
    ]
    rows += [
        (f"peak RSS, {n} cached samples", f"{mib:.0f} MiB (train process + loader workers)") for n, mib in result.rss
    ]
    out_console.print(table("apmpipe bench train", rows))


def bench_ablation(teacher: dict[str, Any], rows: list[Any], steps: int) -> None:
    """``apmpipe bench ablation``: held-out R2 and head top-1 per switched-off objective."""
    lines = [
        ("teacher", f"{teacher['folder']}: val top-1 {teacher['val_top1']:.3f} ({teacher['data']})"),
        ("steps per run", str(steps)),
        (
            "baseline",
            "the mean-token predictor (each location's mean training token): R2 0 on every level and part; R2 = "
            "1 - MSE / its MSE, held out",
        ),
    ]
    for row in rows:
        r2 = ", ".join(
            f"L{layer} {shown(f.get('patch_r2'))}/{shown(f.get('prefix_r2'))}" for layer, f in row.fidelity.items()
        )
        s = row.head.get("student", {}).get("top1")
        t = row.head.get("teacher", {}).get("top1")
        ratio = shown(s / t if s is not None and t else None)
        lines.append(
            (
                row.name,
                f"R2 patch/CLS {r2} | head top-1 {shown(s)} / teacher {shown(t)} = {ratio}x | {row.seconds:.0f} s",
            )
        )
    out_console.print(table("apmpipe bench ablation", lines))


def bench_bytes(teacher: dict[str, Any], rows: list[Any], steps: int, record: Path) -> None:
    """``apmpipe bench bytes``: bytes read per trained sample beside held-out patch cosine and head top-1, each
    against the first (default) row."""
    base = rows[0]
    lines = [
        ("teacher", f"{teacher['folder']}: val top-1 {teacher['val_top1']:.3f} ({teacher['data']})"),
        ("steps per run", f"{steps} (same seed; students evaluated on the float16 val cache)"),
        ("bar", "<= 1/8 of the default's bytes, patch cosine within 0.005 per level, head top-1 within 0.5 pt"),
    ]
    for row in rows:
        base_cos = base.patch_cosines()
        cosines = ", ".join(
            f"L{layer} {cos:.4f} ({cos - base_cos[layer]:+.4f})" for layer, cos in row.patch_cosines().items()
        )
        verdict = "baseline" if row is base else ("meets the bar" if row.meets_bar(base) else "misses the bar")
        lines.append(
            (
                row.run.name,
                f"{human_bytes(row.bytes_per_trained_sample)}/trained sample "
                f"({row.bytes_per_trained_sample / base.bytes_per_trained_sample:.3f}x) | patch cos {cosines} | "
                f"head top-1 {row.top1():.3f} ({row.top1() - base.top1():+.3f}) | {verdict} | {row.run.seconds:.0f} s",
            )
        )
    out_console.print(table("apmpipe bench bytes", lines))
    err_console.print(f"bench: figures saved in {record}", highlight=False)


def bench_codecs(result: Any) -> None:
    """``apmpipe bench codecs``: each --codec's stored bytes and encode/decode rates per array, then per sample."""
    lines = [
        ("machine", result.machine),
        (
            "cache",
            f"{result.url}: first {result.samples} samples of its first complete shard group, written to a "
            "scratch folder as extract writes them, read back one block at a time as a loader thread reads them",
        ),
    ]
    for row in result.rows:
        lines.append(
            (
                f"{row.array}, {row.codec}",
                f"{human_bytes(row.stored_bytes_per_sample)}/sample (raw / stored {row.ratio:.3f}) | "
                f"encode {row.encode_mb_s:,.0f} MB/s | decode {row.decode_mb_s:,.0f} MB/s",
            )
        )
    for codec, (stored, rate) in result.totals().items():
        default = " (default)" if codec == result.default else ""
        lines.append((f"per sample, {codec}{default}", f"{human_bytes(stored)} stored | decoded {rate:,.0f} samples/s"))
    out_console.print(table("apmpipe bench codecs", lines))


def bench_augment(teacher: str, rows: list[Any], crop_scale: tuple[float, float]) -> None:
    """``apmpipe bench augment``: cosine of the augmented targets to the teacher on augmented images, per level."""
    lines = [
        ("teacher", teacher),
        (
            "reads",
            "cosine to the teacher's tokens on the augmented image: --augment's target | baseline: the "
            "un-augmented cached tokens",
        ),
    ]
    for row in rows:
        view = (
            "every image flipped"
            if row.augment == "flip"
            else f"every image cropped, --crop-scale {crop_scale[0]:g},{crop_scale[1]:g}"
        )
        for layer, parts in row.cosine.items():
            cells = [
                f"{part} {cosine:.3f} | baseline {row.baseline[layer][part]:.3f}" for part, cosine in parts.items()
            ]
            lines.append((f"{row.augment} L{layer}", "; ".join(cells)))
        lines.append(
            (
                f"{row.augment} decisions",
                f"{view}: teacher top-1 {row.top1['augmented']:.3f} (original images {row.top1['original']:.3f}); "
                f"the KL target's class is the teacher's on the augmented image for {row.agreement['head']:.3f} "
                f"(head on augmented tokens) | {row.agreement['cached']:.3f} (cached logits)",
            )
        )
    out_console.print(table("apmpipe bench augment", lines))


def _stage_rate(rate: Any) -> str:
    if rate is None:
        return "-"
    core = f" | {rate.per_core:,.0f}/core-s" if rate.per_core else ""
    return f"{rate.samples_per_s:,.0f}/s | {rate.gb_per_s:.2f} GB/s{core}"


def bench_pipeline(result: Any, student_rate: float) -> None:
    """``apmpipe bench pipeline``: every stage of the stage-two data path, old path beside new, the limiting stage,
    the loader's per-core rate and the loader cores a student needs, with the assumptions."""
    stages = Table(
        title="apmpipe bench pipeline (samples/s | decoded GB/s | samples per CPU second)", title_justify="left"
    )
    for column in ("stage", "old path", "new path", "new / old (wall | per core)", "note"):
        stages.add_column(column, style="bold" if column == "stage" else None)
    for stage in result.stages:
        ratio = f"{stage.ratio:.2f}x" if stage.ratio else "-"
        ratio += f" | {stage.core_ratio:.2f}x/core" if stage.core_ratio else ""
        stages.add_row(stage.name, _stage_rate(stage.old), _stage_rate(stage.new), ratio, stage.note)
    out_console.print(stages)
    limit = result.limiting()
    per_core = result.loader_per_core()
    lines = [
        ("machine", result.machine),
        (
            "setup",
            f"{result.cache}: {result.samples} samples, {human_bytes(result.stored_bytes_per_sample)} stored / "
            f"{human_bytes(result.raw_bytes_per_sample)} decoded per sample; batch {result.batch_size}, window "
            f"{result.window}, echo {result.echo}, K={result.locations}, student {result.preset}",
        ),
        (
            "paths",
            f"old: zarr-python in {result.old_workers} DataLoader workers, shared memory to the main process, "
            f"pin-memory thread; new: {result.reader} in the training process, every block of a window in flight, "
            "one window read ahead on a thread, into pinned pages on a GPU",
        ),
        ("limiting stage (new path)", f"{limit.name}: {limit.new.samples_per_s:,.0f} samples/s"),
        ("loader per core", f"{per_core:,.0f} samples/s = {per_core * result.raw_bytes_per_sample / 1e9:.2f} GB/s"),
        (
            "loader cores needed",
            f"{result.loader_cores_needed():.2f} for the measured student ({result.student_rate():,.0f} samples/s)"
            + (
                f"; {result.loader_cores_needed(student_rate):.2f} for --student-rate {student_rate:,.0f}"
                if student_rate
                else ""
            ),
        ),
        (
            "assumptions",
            "page cache warm (every stage runs once untimed first); per core = samples / CPU seconds of the "
            "process's threads and its DataLoader workers; loader cores needed = student rate / echo / loader per "
            f"core (echo={result.echo}: each loaded sample trains {result.echo} steps); the student's rate is from "
            "batches already on the device; a machine shared with other work distorts wall rates, less per core",
        ),
    ]
    out_console.print(table("what limits stage two", lines))
