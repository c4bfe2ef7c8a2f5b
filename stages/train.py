"""Stage two: train the APM student from feature caches, streaming shards; the teacher is never built.

Run: ``apmpipe train CACHE... --out RUN_DIR`` (or under ``torchrun --nproc-per-node N`` for DDP). The whole
loop is :func:`train`: setup, model and optimizer, resume, then one loop over steps. Targets and the exact
teacher input pixels come from the cache (``storage.stream``); this module never imports timm.
"""
from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader

from storage.cache import CacheSpec
from storage.checkpoint import RunDir
from storage.errors import CacheError, ConfigError, ModelError, require_at_least
from storage.stream import CacheStream, StreamPosition

from .apm import APM, APMConfig, config_for_cache, patch_targets
from .runtime import setup_distributed

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Options of one training run (saved as ``config.toml`` and in every checkpoint)."""

    caches: tuple[str, ...]
    out: str
    preset: str = "small"
    hidden: tuple[int, ...] | None = None
    trigger_channels: int | None = None
    pos_dim: int | None = None
    level_mode: str = "heads"
    rgb_weight: float = 1.0
    mse_weight: float = 1.0
    cosine_weight: float = 0.0
    locations: int = 0
    epochs: int = 10
    max_steps: int = 0
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_steps: int = 100
    clip_grad: float = 1.0
    window_samples: int = 512
    loader_workers: int = 2
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 10
    device: str = "auto"
    amp: bool = True
    compile: bool = False
    resume: bool = False
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        require_at_least(self, ("epochs", "batch_size", "window_samples", "checkpoint_every", "log_every"), 1)
        require_at_least(self, ("max_steps", "locations", "warmup_steps", "loader_workers"), 0)
        if self.lr <= 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if min(self.rgb_weight, self.mse_weight, self.cosine_weight) < 0 or self.mse_weight + self.cosine_weight == 0:
            raise ConfigError("loss weights must be >= 0 and --mse-weight + --cosine-weight > 0")

    def to_dict(self) -> dict[str, Any]:
        out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}
        return {k: v for k, v in out.items() if v is not None and k != "storage_options"}

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


@dataclass
class TrainSummary:
    run_dir: str
    steps: int
    epochs_done: float
    seconds: float
    samples: int
    first_loss: float
    last_loss: float
    params: int
    flops_per_image: int
    student: str


def _check_same_plan(stream: CacheStream, world: int) -> None:
    """Under DDP every rank must see the same complete shards (not a cache still being extracted)."""
    if world > 1:
        plans: list[str] = [""] * world
        dist.all_gather_object(plans, stream.fingerprint())
        if len(set(plans)) > 1:
            raise CacheError("DDP ranks see different complete shards (is extraction still running?); finish the caches, then train")


def lr_at(step: int, total: int, config: TrainConfig) -> float:
    """Linear warmup then cosine decay to 10% of ``lr`` (multiplier for LambdaLR)."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def sample_locations(batch: int, tokens: int, count: int, seed: int, step: int) -> torch.Tensor | None:
    """``count`` random locations per image ``[B, count]`` (None = all); a pure function of (seed, step)."""
    if not count or count >= tokens:
        return None
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.rand(batch, tokens, generator=generator).argsort(dim=1)[:, :count]


def level_losses(pred: list[torch.Tensor], targets: list[torch.Tensor], config: TrainConfig) -> list[torch.Tensor]:
    """Per level: ``mse_weight * MSE + cosine_weight * (1 - cosine)`` over the queried tokens."""
    out = []
    for p, t in zip(pred, targets):
        p = p.float()
        loss = config.mse_weight * F.mse_loss(p, t) if config.mse_weight else p.new_zeros(())
        if config.cosine_weight:
            loss = loss + config.cosine_weight * (1 - F.cosine_similarity(p, t, dim=-1)).mean()
        out.append(loss)
    return out


def rgb_loss(rgb: torch.Tensor, images: torch.Tensor, locations: torch.Tensor | None, model: APM) -> torch.Tensor:
    """MSE between predicted and true (normalised) pixels of the queried grid locations; prefix tokens excluded."""
    cfg = model.config
    target = patch_targets(model.fit_input(images), cfg.patch_size)  # [B, h*w, C*ph*pw]
    if locations is None:
        return F.mse_loss(rgb[:, cfg.prefix_tokens :].float(), target)
    grid_index = (locations - cfg.prefix_tokens).clamp(min=0)
    gathered = torch.gather(target, 1, grid_index[..., None].expand(-1, -1, target.shape[-1]))
    mask = (locations >= cfg.prefix_tokens)[..., None].float()
    return ((rgb.float() - gathered) ** 2 * mask).sum() / (mask.sum() * target.shape[-1]).clamp(min=1)


def cache_layout(spec: CacheSpec) -> dict[str, Any]:
    """What a student is bound to: the teacher, its input and token layout (JSON-normalised, as stored)."""
    layout = {"teacher": spec.teacher, "data_config": spec.data_config, "levels": [asdict(lv) for lv in spec.levels], "final_norm": spec.final_norm}
    return json.loads(json.dumps(layout))


class Normalizer(torch.nn.Module):
    """uint8 pixels -> the teacher's normalised input (mean/std from the cache's data config)."""

    def __init__(self, data_config: dict[str, Any]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(data_config["mean"]).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(data_config["std"]).view(1, -1, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels.float() / 255.0 - self.mean) / self.std


StepCallback = Callable[[int, int, dict[str, float]], None]


def make_optimizer(model: APM, config: TrainConfig, total_steps: int, device: torch.device) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (no decay on biases) with warmup + cosine."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, fused=device.type == "cuda")
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, total_steps, config))


def train_step(
    net: torch.nn.Module, model: APM, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
    images: torch.Tensor, targets: list[torch.Tensor], locations: torch.Tensor | None, config: TrainConfig, amp: bool,
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
    """One optimisation step on normalised images and float targets ``[B, T, D]`` per level (gathered if ``locations``)."""
    if locations is not None:
        targets = [torch.gather(t, 1, locations[..., None].expand(-1, -1, t.shape[-1])) for t in targets]
    with torch.autocast(images.device.type, dtype=torch.bfloat16) if amp else nullcontext():
        out = net(images, locations)
        per_level = level_losses(out["tokens"], targets, config)
        loss = sum(per_level)
        rgb = rgb_loss(out["rgb"], images, locations, model) if out["rgb"] is not None else None
        if rgb is not None:
            loss = loss + config.rgb_weight * rgb
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config.clip_grad:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad)
    optimizer.step()
    scheduler.step()
    return loss.detach(), [v.detach() for v in per_level], None if rgb is None else rgb.detach()


def train(config: TrainConfig, on_step: StepCallback | None = None, on_start: Callable[[APM, int], None] | None = None) -> TrainSummary:
    """Train (or resume) a student on ``config.caches``; returns what the CLI summarises."""
    # -- setup ---------------------------------------------------------------------------------------------------
    rank, world, device = setup_distributed(config.device)
    stream = CacheStream(config.caches, config.batch_size, config.window_samples, config.seed, rank, world, storage_options=config.storage_options)
    model_cfg = config_for_cache(stream.spec, config.preset, hidden=config.hidden, trigger_channels=config.trigger_channels,
                                 pos_dim=config.pos_dim, level_mode=config.level_mode, rgb=config.rgb_weight > 0)
    run = RunDir(config.out)
    if run.has_checkpoint() and not config.resume:
        raise ConfigError(f"{config.out} already holds a training run; pass --resume to continue it or choose another --out")
    _check_same_plan(stream, world)
    steps_per_epoch = stream.steps_per_epoch()
    total_steps = config.max_steps or sum(stream.steps_per_epoch(epoch) for epoch in range(config.epochs))
    amp = config.amp and device.type == "cuda"

    # -- model and optimizer -----------------------------------------------------------------------------------
    torch.manual_seed(config.seed)
    model = APM(model_cfg).to(device)
    normalize = Normalizer(stream.spec.data_config).to(device)
    optimizer, scheduler = make_optimizer(model, config, total_steps, device)
    step, position = 0, StreamPosition()

    # -- resume --------------------------------------------------------------------------------------------------
    if config.resume and run.has_checkpoint():
        weights, state = run.load_checkpoint()
        if state["model_config"] != model_cfg.to_dict() or state["layout"] != cache_layout(stream.spec):
            raise ModelError(f"the checkpoint in {config.out} was trained for another student or teacher layout than these caches; use another --out")
        model.load_state_dict(weights)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        step = int(state["step"])
        position = StreamPosition(**state["position"])
        if state.get("plan") != stream.fingerprint():  # caches, batch or world size changed: that epoch's plan differs
            _logger.warning("the data plan changed since the checkpoint (caches, batch size or world size); restarting epoch %d from its start", position.epoch)
            position = StreamPosition(position.epoch, 0, 0)
        if rank == 0:
            run.truncate_metrics(step)
    elif rank == 0 and run.metrics.exists():
        run.metrics.unlink()

    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    net = torch.compile(net) if config.compile else net
    if rank == 0:
        import tomli_w

        run.write_text("config.toml", tomli_w.dumps(config.to_dict()))
        if on_start:
            on_start(model, total_steps)

    def save(path_step: int) -> None:
        if rank == 0:
            state = {"step": path_step, "position": position.to_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "rng": {"torch": torch.get_rng_state()}, "config": config.to_dict(), "model_config": model_cfg.to_dict(),
                     "layout": cache_layout(stream.spec), "world_size": world, "plan": stream.fingerprint()}
            run.save_checkpoint(path_step, model.state_dict(), state)
        if world > 1:
            dist.barrier()

    # -- loop ------------------------------------------------------------------------------------------------------
    start, samples, first_loss, last_loss = time.perf_counter(), 0, float("nan"), float("nan")
    loader_kwargs = {"batch_size": None, "num_workers": config.loader_workers, "pin_memory": device.type == "cuda"}
    if config.loader_workers:
        loader_kwargs["prefetch_factor"] = 1  # items are whole windows: one ahead per worker bounds memory
    while step < total_steps:
        stream.position = position
        for item in DataLoader(stream, **loader_kwargs):
            for offset, batch in enumerate(item["batches"]):
                images = normalize(batch["pixels"].to(device, non_blocking=True))
                targets = [t.to(device, non_blocking=True).float() for t in batch["tokens"]]
                locations = sample_locations(images.shape[0], model_cfg.num_tokens, config.locations, config.seed, step)
                locations = None if locations is None else locations.to(device)
                loss, per_level, rgb = train_step(net, model, optimizer, scheduler, images, targets, locations, config, amp)
                step += 1
                samples += images.shape[0] * world
                position = StreamPosition(position.epoch, item["window"], item["first_batch"] + offset + 1)
                last_loss = float(loss)
                first_loss = last_loss if math.isnan(first_loss) else first_loss
                if step % config.log_every == 0 or step == total_steps:
                    record = {"step": step, "epoch": position.epoch, "lr": scheduler.get_last_lr()[0], "loss": last_loss,
                              "samples_per_s": samples / (time.perf_counter() - start),
                              **{f"loss_level_{lv.layer}": float(v) for lv, v in zip(stream.spec.levels, per_level)}}
                    if rgb is not None:
                        record["loss_rgb"] = float(rgb)
                    if rank == 0:
                        run.append_metrics(record)
                        if on_step:
                            on_step(step, total_steps, record)
                if step % config.checkpoint_every == 0 or step == total_steps:
                    save(step)
                if step >= total_steps:
                    break
            if step >= total_steps:
                break
        else:
            position = StreamPosition(position.epoch + 1, 0, 0)

    # -- export ------------------------------------------------------------------------------------------------
    student = ""
    if rank == 0:
        student = str(run.save_student(model.state_dict(), {"model_config": model_cfg.to_dict(), "layout": cache_layout(stream.spec), "train_config": config.to_dict(), "step": step}))
    if world > 1:
        dist.barrier()
    return TrainSummary(run_dir=config.out, steps=step, epochs_done=step / steps_per_epoch, seconds=time.perf_counter() - start, samples=samples,
                        first_loss=first_loss, last_loss=last_loss, params=model.num_params(), flops_per_image=model.flops_per_image(), student=student)


def build_student(weights: dict[str, torch.Tensor], metadata: dict[str, Any]) -> APM:
    """A trained student from exported weights and metadata (see ``storage.checkpoint.load_student``)."""
    model = APM(APMConfig.from_dict(metadata["model_config"]))
    model.load_state_dict(weights)
    return model.eval()
