"""``apmpipe bench extract``: extraction images/s beside the bare teacher forward of the same images."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from apmpipe.stages.extract import ExtractConfig, extract, extract_shards, loader_workers, teacher_for
from apmpipe.stages.teacher import TeacherPool
from apmpipe.storage.batches import ShardBatches
from apmpipe.storage.sources import resolve_inputs

from .measure import bench_progress, machine_line, synchronize, timed


@dataclass
class ExtractBench:
    images: int
    forward_ips: float
    extract_ips: float
    stored_bytes_per_image: float
    raw_fp32_bytes_per_image: float
    machine: str
    loader_workers: int

    @property
    def ratio(self) -> float:
        return self.extract_ips / self.forward_ips

    @property
    def compression(self) -> float:
        return self.raw_fp32_bytes_per_image / self.stored_bytes_per_image


def bench_extract(config: ExtractConfig) -> ExtractBench:
    """Extraction images/s vs bare ``forward_intermediates`` images/s of the same teacher, batch and device."""
    shards = list(resolve_inputs(config.inputs, folder_block=config.folder_block).shards)
    bench_progress(f"building {config.teacher.name} and decoding {len(shards)} shards")
    teachers = TeacherPool()
    teacher = teacher_for(config, teachers)  # the same instance extract() uses below: built once
    batches = _decoded_batches(config, shards, teacher)
    images = sum(len(b) for b in batches)
    bare_forward = _bare_forward(teacher, batches)
    bench_progress(f"bare forward_intermediates over {images} images (warm-up, then timed)")
    bare_forward()  # warm-up (allocator, kernels)
    before = timed(bare_forward)
    bench_progress("apmpipe extract of the same images")
    summary, run_seconds = _timed_extract(config, teachers)
    bench_progress("bare forward_intermediates again (drift check)")
    forward_seconds = (before + timed(bare_forward)) / 2  # baseline before and after: machine drift cancels
    return ExtractBench(
        images=images,
        forward_ips=images / forward_seconds,
        extract_ips=summary.images / run_seconds,
        stored_bytes_per_image=summary.stored_bytes / max(1, summary.cache_samples),
        raw_fp32_bytes_per_image=_raw_fp32_bytes_per_image(teacher),
        machine=machine_line(teacher.device),
        loader_workers=loader_workers(config.loader_workers, teacher.device.type),
    )


def _decoded_batches(config: ExtractConfig, shards: list[str], teacher: Any) -> list[torch.Tensor]:
    """The pixels of every non-empty batch of ``shards``, decoded once, as extract batches them."""
    batches = ShardBatches(shards, teacher.pixel_transform(), teacher.pixel_shape, config.batch_size, config.label_key)
    return [b["pixels"] for b in batches if len(b["pixels"])]


def _bare_forward(teacher: Any, batches: list[torch.Tensor]) -> Callable[[], None]:
    """The baseline: the teacher's bare ``forward_intermediates`` over ``batches`` at its cached layers."""
    indices = [layer - 1 for layer in teacher.layers]

    def forward() -> None:
        with torch.inference_mode(), torch.autocast(teacher.device.type, dtype=torch.bfloat16, enabled=teacher.amp):
            for pixels in batches:
                teacher.model.forward_intermediates(teacher.normalize(pixels), indices=indices, intermediates_only=True)
        synchronize(teacher.device)

    return forward


def _timed_extract(config: ExtractConfig, teachers: TeacherPool) -> tuple[Any, float]:
    """``apmpipe extract`` of ``config`` with the pool's teacher; its summary and the seconds its shards took."""
    run_seconds: list[float] = []

    def timed_runner(cfg, todo, progress):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        results = extract_shards(cfg, todo, progress, teachers)
        run_seconds.append(time.perf_counter() - start)
        return results

    summary = extract(config, runner=timed_runner, teachers=teachers)
    return summary, run_seconds[0]


def _raw_fp32_bytes_per_image(teacher: Any) -> float:
    """A sample's arrays uncompressed: float32 tokens of every level and logits, uint8 pixels, an int64 label."""
    raw = sum(level.num_tokens * level.dim * 4 for level in teacher.levels) + 4 * teacher.num_classes
    return raw + teacher.pixel_shape[0] * teacher.pixel_shape[1] * teacher.pixel_shape[2] + 8
