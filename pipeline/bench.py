"""``apmpipe bench``: throughput measured side by side in one process, reported as ratios.

Timings on shared machines are noisy, so every benchmark measures its baseline in the same run, on the same
device, with the same model and batch, and prints the ratio (the number to compare against a target).
"""
from __future__ import annotations

import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from stages.extract import ExtractConfig, extract, extract_shards
from stages.teacher import Teacher
from storage.batches import ShardBatches
from storage.sources import resolve_inputs

from .datasets import write_digit_shards


def machine_line(device: torch.device) -> str:
    """One line naming the hardware a number was measured on."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@dataclass
class ExtractBench:
    images: int
    forward_ips: float
    extract_ips: float
    stored_bytes_per_image: float
    raw_fp32_bytes_per_image: float
    machine: str

    @property
    def ratio(self) -> float:
        return self.extract_ips / self.forward_ips

    @property
    def compression(self) -> float:
        return self.raw_fp32_bytes_per_image / self.stored_bytes_per_image


def default_bench_shards(workdir: Path, images: int, size: int) -> list[str]:
    return write_digit_shards(workdir / "shards", count=images, per_shard=max(1, images // 4), size=size, mode="RGB")


def bench_extract(config: ExtractConfig) -> ExtractBench:
    """Extraction images/s vs bare ``forward_intermediates`` images/s of the same teacher, batch and device."""
    shards = list(resolve_inputs(config.inputs, folder_block=config.folder_block).shards)
    teacher = Teacher(config.teacher, config.layers, final_norm=config.final_norm, device=config.device, amp=config.amp)
    batches = [b["pixels"] for b in ShardBatches(shards, teacher.pixel_transform(), teacher.pixel_shape, config.batch_size, config.label_key) if len(b["pixels"])]
    images = sum(len(b) for b in batches)
    indices = [layer - 1 for layer in teacher.layers]

    def bare_forward() -> None:
        with torch.inference_mode(), torch.autocast(teacher.device.type, dtype=torch.bfloat16, enabled=teacher.amp):
            for pixels in batches:
                teacher.model.forward_intermediates(teacher.normalize(pixels), indices=indices, intermediates_only=True)
        if teacher.device.type == "cuda":
            torch.cuda.synchronize()

    bare_forward()  # warm-up (allocator, kernels)
    forward_seconds = timed(bare_forward)
    run_seconds: list[float] = []

    def timed_runner(cfg, todo, progress):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        results = extract_shards(cfg, todo, progress)
        run_seconds.append(time.perf_counter() - start)
        return results

    summary = extract(config, runner=timed_runner)
    raw = sum(level.num_tokens * level.dim * 4 for level in teacher.levels) + 4 * teacher.num_classes
    raw += teacher.pixel_shape[0] * teacher.pixel_shape[1] * teacher.pixel_shape[2] + 8  # uint8 pixels, int64 label
    return ExtractBench(
        images=images, forward_ips=images / forward_seconds, extract_ips=summary.images / run_seconds[0],
        stored_bytes_per_image=summary.stored_bytes / max(1, summary.cache_samples), raw_fp32_bytes_per_image=raw,
        machine=machine_line(teacher.device),
    )


def scratch_dir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="apmpipe-bench-")
