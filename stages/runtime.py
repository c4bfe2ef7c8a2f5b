"""Where code runs: device selection, torchrun (DDP) process-group setup and per-step seeds."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from apmpipe.storage.errors import ConfigError


def resolve_device(device: str) -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``; refuses CUDA where there is none."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return torch.device(device)


def step_seed(*parts: int) -> int:
    """A non-negative 63-bit seed from integers (seed, stream, step, ...): the same in every process, since Python's
    hash of a tuple of ints is not salted per process."""
    return hash(parts) & 0x7FFF_FFFF_FFFF_FFFF


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without waiting for the device: pinned and copied asynchronously on CUDA (a plain
    copy from pageable memory would wait for the work queued before it)."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def loader_workers(requested: int, device_type: str) -> int:
    """Decoding processes for ``--loader-workers`` -1 (auto): one beside a CPU model (which needs the cores), up to
    8 feeding a GPU; other values as given."""
    if requested >= 0:
        return requested
    cores = os.cpu_count() or 2
    return max(1, min(8, cores - 1)) if device_type == "cuda" else 1


def process_rank() -> int:
    """This process's rank under torchrun (0 without it)."""
    return int(os.environ.get("RANK", "0"))


def setup_distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment; initialises the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = process_rank()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    target = resolve_device(device)
    if target.type == "cuda" and world > 1:  # one GPU per rank
        target = torch.device(f"cuda:{local}")
    if world > 1 and not dist.is_initialized():
        if target.type == "cuda":
            torch.cuda.set_device(target)
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo")
    return rank, world, target
