"""Stage two: train the APM student from feature caches, streaming shards; the teacher is never built.

Run: ``apmpipe train CACHE... --out RUN_DIR`` (or under ``torchrun --nproc-per-node N`` for DDP). The whole
loop is :func:`train`: set up (stream, student fitted to the caches' target scales, frozen teacher head),
resume, then one loop over steps that checkpoints and finally exports. Targets, the exact teacher input
pixels and the teacher's logits come from the cache (``apmpipe.storage.stream``); this module never imports timm.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import signal
import time
import tomllib
import types
import typing
from collections.abc import Callable, Collection
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from apmpipe.storage.cache import FeatureCache
from apmpipe.storage.checkpoint import RunDir
from apmpipe.storage.errors import (
    AT_LEAST_ONE,
    NON_NEGATIVE,
    POSITIVE,
    CacheError,
    ConfigError,
    ModelError,
    Range,
    check_ranges,
)
from apmpipe.storage.files import check_writable
from apmpipe.storage.locks import writer_lock
from apmpipe.storage.redact import redact_fields, redact_url
from apmpipe.storage.remote import absolute_url, route_storage_options
from apmpipe.storage.stream import CacheStream, StreamPosition, TokenDecoder, loader_items, window_batches
from apmpipe.storage.tensorboard import ScalarWriter, events_folder

from .apm import APM, DEFAULT_QUERY, DROPOUTS, APMConfig, Locations, config_for_cache
from .augment import augment_generator, check_crop_scale, draw_views, parse_augments
from .extract_config import MORE_VIEWS, few_images_note
from .head import TeacherHead
from .inputs import PixelNormalizer
from .objectives import (
    LossConfig,
    Losses,
    distillation_losses,
    gather_tokens,
    location_generator,
    locations_to,
    sample_level_locations,
    whole_levels,
)
from .runtime import process_rank, setup_distributed, step_seed
from .validation import SCORE, HeldOut, Selection

_logger = logging.getLogger(__name__)

WARMUP_FRACTION = 0.25  # warmup never takes more than this share of the run (docs/train.md, "Warmup")
_DROPOUT_SALT = 0x0D50  # keeps each step's dropout seed apart from its location draws (same seed, rank, step)
CPU_BATCH_SIZE = 64  # --batch-size left unset: images per step per rank on a CPU ...
CUDA_BATCH_SIZE = 1024  # ... and on a GPU, where a small student at 64 is launch-bound
MIN_STEPS = 4000  # --min-steps left unset: the budget at any batch size but ...
CUDA_MIN_STEPS = 2000  # ... CUDA's default batch, 16x the CPU's: 4,000 steps over-fitted held-out CLS (docs/train.md)
BASE_LR = 2e-3  # --lr left unset: the peak LR at LR_BASE_BATCH images per step, scaled by default_lr
LR_BASE_BATCH = 32
DEFAULT_LOCATIONS = 4  # --locations left unset: grid locations per image per step (docs/train.md, images per step)
EMA_DECAYS = Range(0, 0.9999)  # --ema-decay: 0 is off; 1 would never move
# AdamW's fused kernel (all parameters in one pass): the default student's optimiser step on one CPU thread took
# 8.1 ms unfused, 1.3 ms fused
FUSED_ADAMW_DEVICES = ("cuda", "cpu")
POSITION_COUNTS = "echoed-batches"  # what StreamPosition.batch counts in checkpoints (older ones: loaded batches)
# the student's architecture options: over the preset when given, compared with the student's own on --resume
STUDENT_OPTIONS = (
    "hidden",
    "trigger_channels",
    "filter_layers",
    "filter_width",
    "mixer_blocks",
    "mixer_width",
    "trigger_cells",
    "mixer_dropout",
    "trunk",
    "pos_code",
    "pos_dim",
)


@dataclass(frozen=True)
class TrainConfig:
    """Options of one training run (saved as ``config.toml`` and in every checkpoint).

    ``val`` names a held-out cache the student is scored on every ``val_every`` steps (:mod:`.validation`); the run
    then exports the best-scoring weights and, with ``patience`` > 0, stops after that many scores without a better
    one. ``epochs`` 0 (the default) sizes the run from the cache: enough whole epochs for ``min_steps`` optimiser steps,
    at least one and at most ``max_epochs`` (0: no cap); small caches get more passes, large ones at least one.
    ``ema_decay`` above 0 exports an exponential moving average of the weights (:class:`WeightAverage`).
    ``batch_size`` (the device's), ``lr`` (:func:`default_lr`), ``locations`` and ``min_steps`` left None take their
    defaults in :meth:`for_device` before a run starts; ``--resume`` keeps the run's own instead.
    """

    caches: tuple[str, ...]
    out: str
    preset: str = "small"
    hidden: tuple[int, ...] | None = None
    trigger_channels: int | None = None
    filter_layers: int | None = None
    filter_width: int | None = None
    mixer_blocks: int | None = None
    mixer_width: int | None = None
    trigger_cells: int | None = None
    mixer_dropout: float | None = None
    trunk: str | None = None
    pos_code: str | None = None
    pos_dim: int | None = None
    level_mode: str = "heads"
    query: str = DEFAULT_QUERY
    levels: tuple[int, ...] | None = None
    loss: LossConfig = LossConfig()
    standardize: bool = True
    locations: int | None = None
    echo: int = 1
    augment: tuple[str, ...] = ()
    crop_scale: tuple[float, float] = (0.08, 1.0)
    epochs: int = 0
    min_steps: int | None = None
    max_epochs: int = 0
    max_steps: int = 0
    val: str | None = None
    val_every: int = 500
    val_samples: int = 500
    patience: int = 0
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float = 0.05
    ema_decay: float = 0.0
    warmup_steps: int = 200  # docs/train.md, "Warmup"
    clip_grad: float = 1.0
    window_samples: int = 512
    loader_workers: int = 0
    seed: int = 0
    checkpoint_every: int = 500
    checkpoint_minutes: float = 5.0
    log_every: int = 10
    device: str = "auto"
    amp: bool = True
    compile: bool = False
    resume: bool = False
    tensorboard: bool = False
    tensorboard_dir: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)

    RANGES: ClassVar[dict[str, Range]] = {
        "trigger_channels": AT_LEAST_ONE,
        "filter_layers": AT_LEAST_ONE,
        "filter_width": NON_NEGATIVE,
        "mixer_blocks": NON_NEGATIVE,
        "mixer_width": AT_LEAST_ONE,
        "trigger_cells": NON_NEGATIVE,
        "mixer_dropout": DROPOUTS,
        "pos_dim": NON_NEGATIVE,
        "locations": NON_NEGATIVE,
        "echo": AT_LEAST_ONE,
        "epochs": NON_NEGATIVE,
        "min_steps": NON_NEGATIVE,
        "max_epochs": NON_NEGATIVE,
        "max_steps": NON_NEGATIVE,
        "val_every": AT_LEAST_ONE,
        "val_samples": NON_NEGATIVE,
        "patience": NON_NEGATIVE,
        "batch_size": AT_LEAST_ONE,
        "lr": POSITIVE,
        "weight_decay": NON_NEGATIVE,
        "ema_decay": EMA_DECAYS,
        "warmup_steps": NON_NEGATIVE,
        "clip_grad": NON_NEGATIVE,
        "window_samples": AT_LEAST_ONE,
        "loader_workers": NON_NEGATIVE,
        "seed": NON_NEGATIVE,
        "checkpoint_every": AT_LEAST_ONE,
        "checkpoint_minutes": NON_NEGATIVE,
        "log_every": AT_LEAST_ONE,
    }

    def __post_init__(self) -> None:
        check_ranges(vars(self), self.RANGES)
        if self.tensorboard_dir is not None and not self.tensorboard:
            raise ConfigError("--tensorboard-dir needs --tensorboard")
        object.__setattr__(self, "caches", tuple(absolute_url(url) for url in self.caches))  # embed finds them
        if self.val is not None:
            object.__setattr__(self, "val", absolute_url(self.val))
            if self.val in self.caches:
                raise ConfigError(
                    f"--val {redact_url(self.val)} is one of the training caches, so its scores would not be held "
                    "out; pass a cache extracted from other images"
                )
        object.__setattr__(self, "augment", parse_augments(self.augment))
        check_crop_scale(self.crop_scale)

    def for_device(self, device: torch.device) -> TrainConfig:
        """This config with ``batch_size``, ``lr``, ``locations`` and ``min_steps`` set for ``device`` where left unset
        (None); CUDA's fewer default steps go with its default batch only."""
        cuda_default = self.batch_size is None and device.type == "cuda"
        batch = self.batch_size or (CUDA_BATCH_SIZE if cuda_default else CPU_BATCH_SIZE)
        locations = DEFAULT_LOCATIONS if self.locations is None else self.locations
        min_steps = self.min_steps if self.min_steps is not None else CUDA_MIN_STEPS if cuda_default else MIN_STEPS
        return replace(
            self, batch_size=batch, lr=self.lr or default_lr(batch), locations=locations, min_steps=min_steps
        )

    def to_dict(self) -> dict[str, Any]:
        """The options as ``config.toml``, checkpoints and the student record them (URLs redacted)."""
        out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}
        out = redact_fields(out, ("caches", "out", "val", "tensorboard_dir"))
        return {k: v for k, v in out.items() if v is not None and k != "storage_options"}

    @classmethod
    def option_names(cls) -> list[str]:
        """Every settable option, loss weights included (flat, as on the command line and in TOML files)."""
        return [f.name for f in fields(cls) if f.name != "loss"] + [f.name for f in fields(LossConfig)]

    @classmethod
    def from_options(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from flat options (loss weights beside the rest), checking every value's type (TOML files too)."""
        declared = _option_types()
        values = {k: _checked(k, v, declared) for k, v in values.items()}
        loss_names = {f.name for f in fields(LossConfig)}
        loss = LossConfig(**{k: v for k, v in values.items() if k in loss_names})
        return cls(**{k: v for k, v in values.items() if k not in loss_names}, loss=loss)

    @classmethod
    def from_file_and_options(
        cls, options: dict[str, Any], path: str | os.PathLike | None = None, given: Collection[str] = ()
    ) -> TrainConfig:
        """Options from a command line over a TOML file of options: a file value replaces every option whose
        name is not in ``given`` (those set on the command line); ``caches`` and ``out`` only come from
        ``options``. The file's ``storage_options`` table adds to ``options["storage_options"]`` (which wins)."""
        merged = dict(options)
        for key, value in _read_toml(path).items() if path is not None else ():
            name = key.replace("-", "_")
            if name in ("caches", "out"):
                raise ConfigError(
                    f"--config {path}: give {name} on the command line (apmpipe train CACHE... --out "
                    "RUN), not in the file"
                )
            if name == "storage_options" and isinstance(value, dict):
                merged["storage_options"] = {**route_storage_options(value), **merged.get("storage_options", {})}
            elif name not in cls.option_names():
                raise ConfigError(f"--config {path}: unknown option {key!r}; see apmpipe train --help")
            elif name not in given:
                merged[name] = value
        return cls.from_options(merged)


def default_lr(batch_size: int) -> float:
    """The peak LR when ``--lr`` is left unset: ``BASE_LR`` scaled by sqrt(batch / LR_BASE_BATCH), the square-root
    rule for Adam-type optimisers (the gradient noise scale falls as 1/sqrt(batch)); 2e-3 at 32, ~2.8e-3 at 64 (the
    CPU default), ~1.1e-2 at 1024 (CUDA's)."""
    return BASE_LR * math.sqrt(batch_size / LR_BASE_BATCH)


def _read_toml(path: str | os.PathLike) -> dict[str, Any]:
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError(f"--config {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config {path} is not valid TOML: {exc}") from None


def _option_types() -> dict[str, Any]:
    """The declared type of every option (the configs' fields, not their class constants)."""
    return {
        f.name: typing.get_type_hints(config)[f.name] for config in (LossConfig, TrainConfig) for f in fields(config)
    }


def _checked(name: str, value: Any, declared: dict[str, Any]) -> Any:
    """``value`` as option ``name``'s ``declared`` type (ints for floats are widened); ConfigError naming both."""
    expected = declared.get(name)
    if expected is None:
        raise ConfigError(f"unknown training option {name!r}; see apmpipe train --help")
    if value is None and type(None) in typing.get_args(expected):
        return value
    base = (
        next((t for t in typing.get_args(expected) if t is not type(None)), expected)
        if typing.get_origin(expected) in (typing.Union, types.UnionType)
        else expected
    )
    origin = typing.get_origin(base) or base
    if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if origin is tuple and isinstance(value, (list, tuple)):
        item = typing.get_args(base)[0]
        if item is float:
            value = [float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
        if all(isinstance(v, item) and not isinstance(v, bool) for v in value):
            return tuple(value)
    elif isinstance(value, origin) and not (origin is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"training option {name!r} must be {getattr(base, '__name__', str(base))}, got {value!r}")


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
    stopped_by: int = 0  # the signal (SIGINT, SIGTERM) that ended the run early, after a checkpoint; 0: finished
    held_out: dict[str, Any] = field(default_factory=dict)  # with --val: Selection.summary() and the cache
    options: dict[str, Any] = field(default_factory=dict)  # as the run resolved them (the device's batch and LR)


StepCallback = Callable[[int, int, dict[str, float]], None]


def planned_steps(stream: CacheStream, config: TrainConfig) -> tuple[int, int]:
    """(epochs, total steps): ``--max-steps`` wins; ``--epochs 0`` sizes the run to ``min_steps``, at least one
    epoch and at most ``max_epochs`` (0: no cap), so a small cache is not passed hundreds of times. Each loaded
    window is passed ``echo`` times (example echoing)."""
    per_epoch = stream.steps_per_epoch()
    epochs = config.epochs or max(1, math.ceil(config.min_steps / per_epoch))
    if not config.epochs and config.max_epochs:
        epochs = min(epochs, config.max_epochs)
    return epochs, config.max_steps or sum(stream.steps_per_epoch(epoch) for epoch in range(epochs))


def lr_at(step: int, total: int, warmup: int) -> float:
    """Linear warmup then cosine decay to 10% of ``lr`` (multiplier for LambdaLR)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def warmup_for(total_steps: int, config: TrainConfig) -> int:
    """``--warmup-steps``, capped at ``WARMUP_FRACTION`` of the run (a short run must not end in warmup)."""
    return min(config.warmup_steps, max(1, int(WARMUP_FRACTION * total_steps)))


def adamw(params: Any, device: torch.device, **options: Any) -> torch.optim.AdamW:
    """AdamW, fused (one kernel for every parameter) on the devices where torch has that kernel."""
    return torch.optim.AdamW(params, fused=device.type in FUSED_ADAMW_DEVICES, **options)


def make_optimizer(
    model: APM, config: TrainConfig, total_steps: int, device: torch.device
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (no decay on biases, norms and :meth:`APM.no_weight_decay`) with warmup + cosine."""
    exempt = model.no_weight_decay()
    decay = [p for name, p in model.named_parameters() if p.ndim >= 2 and name not in exempt]
    no_decay = [p for name, p in model.named_parameters() if p.ndim < 2 or name in exempt]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = adamw(groups, device, lr=config.lr)
    warmup = warmup_for(total_steps, config)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, total_steps, warmup))


class WeightAverage:
    """Exponential moving average of a model's parameters (``--ema-decay``), updated after every optimiser step.

    The decay ramps up as ``min(decay, (1 + step) / (10 + step))`` so that the first weights fade out early (as in
    timm's ``ModelEmaV3`` warmup). The run exports the average and checkpoints it beside the raw weights."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.names = [name for name, _ in model.named_parameters()]
        self.params = [p for _, p in model.named_parameters()]
        self.average = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold in the weights after optimiser step ``step`` (0-based)."""
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1.0 - decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.average, strict=True))

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for average, name in zip(self.average, self.names, strict=True):
            average.copy_(state[name])

    def weights(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """``model``'s state dict with the averaged parameters in place of its own (buffers as they are)."""
        return model.state_dict() | self.state_dict()


def rebuilds_on_device(device: torch.device) -> bool:
    """Whether low-rank tokens cross to ``device`` as coefficients and are rebuilt there: on a GPU (K/D of the
    copy, the product is cheap there); on a CPU the loader's worker processes rebuild them beside the step."""
    return device.type == "cuda"


def teacher_head(stream: CacheStream, config: TrainConfig, device: torch.device) -> TeacherHead | None:
    """The frozen teacher head stored in the first cache, when the decision loss is on and the cache has one.

    Refuses ``--levels`` without the final cached level while the decision loss is on: the head reads that level.
    """
    if not config.loss.logit_weight:
        return None
    cache = FeatureCache.open(stream.urls[0], storage_options=config.storage_options)
    stored = cache.head()
    if stored is not None and not cache.select_levels(config.levels).keeps_final_level():
        raise ConfigError(
            f"--levels {','.join(map(str, config.levels or ()))} leaves out the final cached level "
            f"({cache.spec.levels[-1].layer}) that the teacher head reads; add it or pass --logit-weight 0"
        )
    return TeacherHead(*stored).to(device).requires_grad_(False) if stored else None


def fit_target_scales(model: APM, stream: CacheStream, standardize: bool = True) -> None:
    """Standardise each level's targets with the training caches' moments (stored in the student, with the
    mean-token baseline); ``standardize=False`` trains on raw targets."""
    for scale, moments, prefix in zip(model.scales, stream.moments, model.config.prefixes, strict=True):
        scale.fit(
            torch.from_numpy(moments.mean).float(), torch.from_numpy(moments.variance).float(), prefix, standardize
        )


def step_losses(
    net: torch.nn.Module,
    model: APM,
    images: torch.Tensor,
    targets: list[torch.Tensor],
    locations: Locations,
    loss_config: LossConfig,
    amp: bool,
    head: TeacherHead | None = None,
    teacher_logits: torch.Tensor | None = None,
) -> Losses:
    """Forward and objective of one step on normalised images and teacher tokens ``[B, T_l, D_l]`` per level: the
    part ``--compile`` compiles (every batch of a run has the same shapes; nothing here waits for the device)."""
    targets = [gather_tokens(t, where) for t, where in zip(targets, model.level_locations(locations), strict=True)]
    with torch.autocast(images.device.type, dtype=torch.bfloat16) if amp else nullcontext():
        out = net(images, locations)
        return distillation_losses(model, out, targets, locations, images, loss_config, head, teacher_logits)


Objective = Callable[..., Losses]  # step_losses, or torch.compile(step_losses)


def compiled_objective() -> Objective:
    """:func:`step_losses` compiled for fixed shapes (``dynamic=False``: the stream's batches are all full, so one
    graph serves the whole run; a different batch shape compiles its own graph instead of a dynamic one)."""
    return torch.compile(step_losses, dynamic=False)


def train_step(
    net: torch.nn.Module,
    model: APM,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR | None,
    images: torch.Tensor,
    targets: list[torch.Tensor],
    locations: Locations,
    loss_config: LossConfig,
    amp: bool,
    clip_grad: float = 1.0,
    head: TeacherHead | None = None,
    teacher_logits: torch.Tensor | None = None,
    objective: Objective = step_losses,
) -> Losses:
    """One optimisation step (``objective``: eager or compiled forward and loss); returns the loss terms, still on
    the device (reading them waits for the step: log them every few steps, not every step)."""
    losses = objective(net, model, images, targets, locations, loss_config, amp, head, teacher_logits)
    optimizer.zero_grad(set_to_none=True)
    losses.total.backward()
    if clip_grad:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return losses


def _check_same_plan(stream: CacheStream, world: int) -> None:
    """Under DDP every rank must see the same complete shards (not a cache still being extracted)."""
    if world > 1:
        plans: list[str] = [""] * world
        dist.all_gather_object(plans, stream.fingerprint())
        if len(set(plans)) > 1:
            raise CacheError(
                "DDP ranks see different complete shards (is extraction still running?); finish the caches, then train"
            )


@dataclass
class _Run:
    """Everything the loop touches, built once by :func:`_set_up`."""

    config: TrainConfig
    rank: int
    world: int
    device: torch.device
    stream: CacheStream
    model: APM
    net: torch.nn.Module
    normalize: PixelNormalizer
    head: TeacherHead | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    run_dir: RunDir
    total_steps: int
    amp: bool
    objective: Objective
    decoder: TokenDecoder | None = None
    average: WeightAverage | None = None
    held_out: HeldOut | None = None  # with --val (every rank checks it; the rank that writes the run scores)
    selection: Selection | None = None  # with --val
    step: int = 0
    position: StreamPosition = StreamPosition()
    events: str | None = None  # TensorBoard's folder (rank 0, with --tensorboard)
    scalars: ScalarWriter | None = None
    checkpoint: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None  # what --resume continues from

    def state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "position": self.position.to_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state()},
            "config": self.config.to_dict(),
            "model_config": self.model.config.to_dict(),
            "layout": self.stream.spec.layout(),
            "world_size": self.world,
            "plan": self.stream.fingerprint(),
            "position_counts": POSITION_COUNTS,
            **({"ema": self.average.state_dict()} if self.average else {}),
            **({"selection": self.selection.state_dict()} if self.selection else {}),
        }

    @property
    def finished(self) -> bool:
        """Every planned step is done, or ``--patience`` held-out scores in a row did not beat the best."""
        return self.step >= self.total_steps or bool(self.selection and self.selection.stalled)

    def exported_weights(self) -> dict[str, torch.Tensor]:
        """The weights the run would export now: the weight average with ``--ema-decay``, else the weights as
        trained."""
        return self.average.weights(self.model) if self.average else self.model.state_dict()

    def student_weights(self) -> dict[str, torch.Tensor]:
        """What the run exports at its end: with ``--val``, the best held-out score's weights."""
        return self.selection.weights if self.selection and self.selection.weights else self.exported_weights()

    def held_out_summary(self) -> dict[str, Any]:
        """With ``--val``: the selection (best and last score, the best's step) and the held-out cache."""
        if not self.selection or not self.selection.weights:
            return {}
        return {**self.selection.summary(), "cache": redact_url(self.config.val or "")}

    def metadata(self) -> dict[str, Any]:
        held_out = self.held_out_summary()
        return {
            "model_config": self.model.config.to_dict(),
            "layout": self.stream.spec.layout(),
            "train_config": self.config.to_dict(),
            "loss_config": self.config.loss.to_dict(),
            "step": self.step,
            **({"held_out": held_out} if held_out else {}),
        }


def _keep_run_options(config: TrainConfig) -> TrainConfig:
    """``--resume`` keeps the run's own batch size, LR, locations per step and step budget where this command leaves
    them unset (the device's defaults, 64 images on a CPU and 1,024 on CUDA, would change them when a run moves
    between devices, and the defaults change between releases), its held-out cache (``--val``: a new location may be
    given, as for the caches) and its student's query (a run saved before ``--query`` existed is a
    ``paper`` student)."""
    if not config.resume:
        return config
    saved = RunDir(config.out, config.storage_options).saved_options()
    if not saved:  # nothing to resume yet: this command's options start the run
        return config
    return replace(
        config,
        batch_size=config.batch_size or saved.get("batch_size"),
        lr=config.lr or saved.get("lr"),
        locations=saved.get("locations") if config.locations is None else config.locations,
        min_steps=saved.get("min_steps") if config.min_steps is None else config.min_steps,
        val=config.val or saved.get("val"),
        query=saved.get("query", BEFORE_OPTIONS["query"]),
    )


def _warn_if_few_images(stream: CacheStream) -> None:
    """One warning when the caches hold too few distinct images and views (:func:`few_images_note`): held-out CLS
    will trail training, and what helps."""
    note = few_images_note(stream.plan.images, stream.plan.views)
    if note:
        _logger.warning(
            "%s; extract more views (extract %s, the default) and score held-out images while training (--val): "
            "docs/train.md, 'Few images'",
            note,
            MORE_VIEWS,
        )


def _set_up(config: TrainConfig) -> _Run:
    rank, world, device = setup_distributed(config.device)
    config = _keep_run_options(config).for_device(device)
    if config.patience and not config.val:  # checked here: --resume keeps the run's own --val
        raise ConfigError("--patience counts held-out scores: pass --val CACHE (a cache of other images) with it")
    stream = CacheStream(
        config.caches,
        config.batch_size,
        config.window_samples,
        config.seed,
        rank,
        world,
        storage_options=config.storage_options,
        logits=config.loss.logit_weight > 0,
        levels=config.levels,
        coefficients=rebuilds_on_device(device),
        echo=config.echo,
    )
    if rank == 0 and not config.val:
        _warn_if_few_images(stream)
    run_dir = RunDir(config.out, config.storage_options)
    if run_dir.has_checkpoint() and not config.resume:
        raise ConfigError(
            f"{redact_url(config.out)} already holds a training run; pass --resume to continue it or choose another "
            "--out"
        )
    checkpoint = _checkpoint_to_resume(config, run_dir, stream) if config.resume else None
    model_cfg = (
        APMConfig.from_dict(checkpoint[1]["model_config"])  # the run's own student, whatever the presets say now
        if checkpoint
        else config_for_cache(
            stream.spec,
            config.preset,
            **{name: getattr(config, name) for name in STUDENT_OPTIONS},
            level_mode=config.level_mode,
            query=config.query,
            rgb=config.loss.rgb_weight > 0,
        )
    )
    events = events_folder(run_dir, config.tensorboard_dir) if config.tensorboard else None  # every rank checks it
    _check_same_plan(stream, world)
    _, total_steps = planned_steps(stream, config)
    torch.manual_seed(config.seed)
    model = APM(model_cfg)
    fit_target_scales(model, stream, config.standardize)
    model = model.to(device)
    optimizer, scheduler = make_optimizer(model, config, total_steps, device)
    net = (
        torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if world > 1
        else model
    )
    return _Run(
        config,
        rank,
        world,
        device,
        stream,
        model,
        net,
        PixelNormalizer(stream.spec.data_config).to(device),
        teacher_head(stream, config, device),
        optimizer,
        scheduler,
        run_dir,
        total_steps,
        config.amp and device.type == "cuda",
        compiled_objective() if config.compile else step_losses,
        TokenDecoder(stream.coefficient_bases).to(device) if stream.coefficient_bases else None,
        WeightAverage(model, config.ema_decay) if config.ema_decay else None,
        HeldOut.open(config.val, stream.spec.layout(), config.val_samples, config.seed, config.storage_options)
        if config.val
        else None,
        Selection(config.patience) if config.val else None,
        events=events if rank == 0 else None,
        checkpoint=checkpoint,
    )


# options added after runs were first saved: a run saved without one trained as this value says
BEFORE_OPTIONS: dict[str, Any] = {
    "query": "paper",
    "ema_decay": 0.0,
    "max_epochs": 0,
    "val_every": 500,
    "val_samples": 500,
    "patience": 0,
}
RESUME_MAY_CHANGE = (
    "caches",
    "val",  # moved or copied, like the caches (HeldOut.open checks its layout)
    "out",
    "resume",
    "device",
    "amp",
    "compile",
    "loader_workers",
    "log_every",
    "checkpoint_every",
    "checkpoint_minutes",
    "tensorboard",
    "tensorboard_dir",
)


def flat_options(options: dict[str, Any]) -> dict[str, Any]:
    """A saved ``TrainConfig.to_dict()`` with the loss weights beside the other options."""
    return {k: v for k, v in options.items() if k != "loss"} | options.get("loss", {})


def _as_typed(value: Any) -> Any:
    """An option's value as a user types it (lists comma-separated; unset: ``(default)``)."""
    if value is None:
        return "(default)"
    return ",".join(map(str, value)) if isinstance(value, list) else value


def changed_options(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``--name NOW (run: SAVED)`` for every option that would change a resumed run's result."""
    # an option at None (e.g. --levels: all) is left out of both; one the run predates had its BEFORE_OPTIONS value
    old, new = {**BEFORE_OPTIONS, **flat_options(saved)}, flat_options(now)
    return [
        f"--{k.replace('_', '-')} {_as_typed(new.get(k))} (run: {_as_typed(old.get(k))})"
        for k in sorted(set(old) | set(new), key=[*new, *old].index)
        if k not in RESUME_MAY_CHANGE and new.get(k) != old.get(k)
    ]


# architecture options whose value may differ from the student's yet build the same one (0: "as wide as T"; a
# filter of one layer has no inner width; a student without a mixer has no mixer width), with the derived width
# that decides
SAME_WHEN_EQUAL = {"filter_width": "filter_widths", "pos_dim": "code_dim", "mixer_width": "local_dim"}


def _with_student_options(saved: dict[str, Any], model_config: dict[str, Any], now: dict[str, Any]) -> dict[str, Any]:
    """A run's saved options plus, for each architecture option this command sets and the run left to its preset,
    the value its student was built with (so ``--trunk mlp`` on a run whose preset gave ``mlp`` is no change), and
    this command's value of an option in :data:`SAME_WHEN_EQUAL` that builds the same student."""
    student = APMConfig.from_dict(model_config)
    built = {k: getattr(student, k) for k in STUDENT_OPTIONS if k in now and k not in saved}
    same = {
        k: now[k]
        for k, derived in SAME_WHEN_EQUAL.items()
        if k in now and getattr(replace(student, **{k: now[k]}), derived) == getattr(student, derived)
    }
    return {**saved, **{k: list(v) if isinstance(v, tuple) else v for k, v in built.items()}, **same}


def _checkpoint_to_resume(
    config: TrainConfig, run_dir: RunDir, stream: CacheStream
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The newest checkpoint's weights and state, refused when these caches or this command's options would change
    the run (options left unset keep the run's own: its student is rebuilt from the checkpoint, not the presets)."""
    weights, state = run_dir.load_checkpoint()
    now = config.to_dict()
    changes = changed_options(_with_student_options(state["config"], state["model_config"], now), now)
    if state["layout"] != stream.spec.layout():
        listed = f" ({', '.join(changes)})" if changes else ""
        raise ModelError(
            f"the checkpoint in {redact_url(config.out)} was trained for another teacher layout than these "
            f"caches{listed}; use another --out"
        )
    if changes:
        raise ConfigError(
            f"--resume would change the run in {redact_url(config.out)}: {', '.join(changes)}; resume with the "
            "run's options or train into another --out"
        )
    return weights, state


def _resume(run: _Run) -> None:
    """Load the checkpoint :func:`_set_up` read into ``run`` (weights, optimiser, schedule, RNG, stream position)."""
    assert run.checkpoint is not None, "_set_up reads the checkpoint of a resumed run"
    weights, state = run.checkpoint
    run.checkpoint = None  # the loop does not need a second copy of the weights
    run.model.load_state_dict(weights)
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if run.average:
        run.average.load_state_dict(state["ema"])
    if run.selection and "selection" in state:
        run.selection.load_state_dict(state["selection"])
    torch.set_rng_state(state["rng"]["torch"])
    run.step = int(state["step"])
    run.position = StreamPosition(**state["position"])
    if state.get("plan") != run.stream.fingerprint():  # caches, batch or world size changed: that epoch's plan differs
        _logger.warning(
            "the data plan changed since the checkpoint (caches, batch size or world size); restarting "
            "epoch %d from its start",
            run.position.epoch,
        )
        run.position = StreamPosition(run.position.epoch, 0, 0)
    elif state.get("position_counts") != POSITION_COUNTS and run.config.echo > 1:
        _logger.warning(
            "the checkpoint counts echoed batches the way an older apmpipe did; restarting epoch %d from its start",
            run.position.epoch,
        )
        run.position = StreamPosition(run.position.epoch, 0, 0)
    if run.rank == 0:
        run.run_dir.truncate_metrics(run.step)


def _checkpoint(run: _Run) -> None:
    if run.rank == 0:
        run.run_dir.save_checkpoint(run.step, run.model.state_dict(), run.state())
        if run.scalars:
            run.scalars.flush()
    if run.world > 1:
        dist.barrier()


def _validate(run: _Run) -> dict[str, float]:
    """Score the weights the run would export now on the held-out cache, fold the score into the selection and
    record it (``metrics.jsonl``, TensorBoard); returns the record."""
    assert run.held_out is not None and run.selection is not None, "only a run with --val scores"
    model, weights = run.model, run.exported_weights()
    if run.average:  # the average is what would be exported, so it is what is scored
        model = copy.deepcopy(run.model)
        model.load_state_dict(weights)
    scores = run.held_out.score(model, run.device)
    run.selection.add(run.step, scores[SCORE], weights)
    record = {"step": run.step, **scores, "val_best": run.selection.best}
    run.run_dir.append_metrics(record)
    if run.scalars:
        run.scalars.write(record)
    return record


def _agreed(run: _Run, *flags: bool) -> list[bool]:
    """``flags`` true on any rank (under DDP every rank must checkpoint and stop at the same step)."""
    if run.world == 1:
        return list(flags)
    values = torch.tensor([int(f) for f in flags], device=run.device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [bool(v) for v in values.tolist()]


def _augmented(
    run: _Run, images: torch.Tensor, targets: list[torch.Tensor], logits: torch.Tensor | None
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
    """This step's ``--augment`` view of a batch (seeded by seed, rank and step): pixels and every level's tokens
    transformed alike; the KL target becomes the stored head on the augmented final-level tokens (the cached
    logits describe the un-augmented image; these agree with the tokens the student is asked for)."""
    cfg = run.model.config
    generator = augment_generator(run.config.seed, run.rank, run.step)
    size = (images.shape[-2], images.shape[-1])
    views = draw_views(run.config.augment, len(images), size, cfg.grid, generator, run.config.crop_scale)
    targets = [views.tokens(t, grid, prefix) for t, grid, prefix in zip(targets, cfg.grids, cfg.prefixes, strict=True)]
    if logits is not None and run.head is not None:
        with torch.no_grad():
            logits = run.head(targets[-1])
    return views.images(images), targets, logits


def seed_dropout(seed: int, rank: int, step: int) -> None:
    """Seed torch's global generators, which the mixer's dropout draws from, for one step: distinct per seed, rank and
    step, so a resumed run draws the masks an unbroken one drew."""
    torch.manual_seed(step_seed(_DROPOUT_SALT, seed, rank, step))


def _optimise(run: _Run, images: torch.Tensor, targets: list[torch.Tensor], logits: torch.Tensor | None) -> Losses:
    """One optimiser step on a batch (augmented with ``--augment``) with this step's locations and dropout (seeded
    by seed, rank and step; the mixer's dropout from the end of the warmup on)."""
    cfg = run.model.config
    if cfg.mixer_dropout:
        run.model.drop_in_mixer(run.step >= warmup_for(run.total_steps, run.config))
        seed_dropout(run.config.seed, run.rank, run.step)
    if run.config.augment:
        images, targets, logits = _augmented(run, images, targets, logits)
    generator = location_generator(run.config.seed, run.rank, run.step)
    whole = whole_levels(cfg, run.head)
    locations = sample_level_locations(cfg, images.shape[0], run.config.locations, generator, whole)
    locations = locations_to(locations, run.device)
    losses = train_step(
        run.net,
        run.model,
        run.optimizer,
        run.scheduler,
        images,
        targets,
        locations,
        run.config.loss,
        run.amp,
        run.config.clip_grad,
        run.head,
        logits,
        run.objective,
    )
    if run.average:
        run.average.update(run.step)
    run.step += 1
    return losses


def _batches(run: _Run):
    """(stream position after the batch, batch) from the current position to the end of training, epoch after epoch."""
    while True:
        run.stream.position = run.position
        for item in loader_items(run.stream, run.config.loader_workers, pin_memory=run.device.type == "cuda"):
            for offset, batch in enumerate(window_batches(item, run.device)):
                yield StreamPosition(run.position.epoch, item["window"], item["first_batch"] + offset + 1), batch
        run.position = StreamPosition(run.position.epoch + 1, 0, 0)


def train(
    config: TrainConfig,
    on_step: StepCallback | None = None,
    on_start: Callable[[APM, int], None] | None = None,
    on_resume: Callable[[int, int], None] | None = None,
    stop_requested: Callable[[], int] | None = None,
) -> TrainSummary:
    """Train (or resume) a student on ``config.caches``; returns what the CLI summarises.

    The rank that writes the run folder holds its writer lock throughout: a second run into the same ``--out`` is
    refused, naming this one. ``on_resume(step, total)`` is called when a checkpoint was loaded.
    ``stop_requested()`` returns the signal that asks the run to stop (0: none): it then ends after a checkpoint,
    without exporting the student.
    """
    check_writable(config.out)
    with writer_lock(config.out, "train", config.storage_options) if process_rank() == 0 else nullcontext():
        return _train(config, on_step, on_start, on_resume, stop_requested)


def _train(
    config: TrainConfig,
    on_step: StepCallback | None,
    on_start: Callable[[APM, int], None] | None,
    on_resume: Callable[[int, int], None] | None,
    stop_requested: Callable[[], int] | None,
) -> TrainSummary:
    run = _set_up(config)
    config = run.config  # batch size and LR set for the device
    if run.rank == 0:
        run.run_dir.remove_stale_temporaries()
    if config.resume:
        _resume(run)
        if run.rank == 0 and on_resume:  # a run --patience stopped is as done as one that ran every step
            on_resume(run.step, run.step if run.finished else run.total_steps)
    elif run.rank == 0:
        run.run_dir.reset_metrics()
    if run.rank == 0:
        import tomli_w

        run.run_dir.write_text("config.toml", tomli_w.dumps(run.config.to_dict()))
        run.scalars = ScalarWriter(run.events, purge_step=run.step + 1) if run.events else None
        if on_start:
            on_start(run.model, run.total_steps)

    start, samples = time.perf_counter(), 0
    first: torch.Tensor | None = None  # the first and last steps' total loss, read once the run ends
    last: torch.Tensor | None = None
    layers, waited, ready = [level.layer for level in run.stream.spec.levels], 0.0, time.perf_counter()
    saved, stop = time.monotonic(), False
    for position, batch in _batches(run) if not run.finished else ():
        waited += time.perf_counter() - ready  # the step waited this long for the loader
        images = run.normalize(batch["pixels"])
        targets = run.decoder(batch["tokens"]) if run.decoder is not None else batch["tokens"]
        losses = _optimise(run, images, targets, batch.get("logits"))
        last = losses.total.detach()
        first = last if first is None else first
        if run.rank == 0 and (run.step % config.log_every == 0 or run.step == run.total_steps):
            record = {  # reading the losses waits for the device: here and at checkpoints, not every step
                "step": run.step,
                "epoch": position.epoch,
                "lr": run.scheduler.get_last_lr()[0],
                **losses.record(layers),
                "samples_per_s": samples / max(time.perf_counter() - start, 1e-9),
                "data_wait_s": waited,
            }
            waited = 0.0
            run.run_dir.append_metrics(record)
            if run.scalars:
                run.scalars.write(record)
            if on_step:
                on_step(run.step, run.total_steps, record)
        run.position = position
        samples += images.shape[0] * run.world  # trained samples (an echoed sample counts once per step it trains)
        if run.rank == 0 and run.held_out and (run.step % config.val_every == 0 or run.step >= run.total_steps):
            record = _validate(run)
            if on_step:
                on_step(run.step, run.total_steps, record)
        stop, due, stalled = _agreed(
            run,
            bool(stop_requested and stop_requested()),
            0 < config.checkpoint_minutes * 60 <= time.monotonic() - saved,
            bool(run.selection and run.selection.stalled),
        )
        if stalled and run.selection:  # the writing rank decided: every rank stops here
            run.selection.since_best = max(run.selection.since_best, run.selection.patience)
        if stop or due or stalled or run.step % config.checkpoint_every == 0 or run.step >= run.total_steps:
            _checkpoint(run)
            saved = time.monotonic()
        if stop or run.finished:
            break
        ready = time.perf_counter()

    stopped_by = ((stop_requested and stop_requested()) or int(signal.SIGTERM)) if stop else 0
    student = (
        str(run.run_dir.save_student(run.student_weights(), run.metadata())) if run.rank == 0 and not stopped_by else ""
    )
    if run.scalars:
        run.scalars.close()
    if run.world > 1:
        dist.barrier()
    return TrainSummary(
        run_dir=config.out,
        steps=run.step,
        epochs_done=run.step / run.stream.steps_per_epoch(),
        seconds=time.perf_counter() - start,
        samples=samples,
        first_loss=float("nan") if first is None else float(first),
        last_loss=float("nan") if last is None else float(last),
        params=run.model.num_params(),
        flops_per_image=run.model.flops_per_image(),
        student=student,
        stopped_by=stopped_by,
        held_out=run.held_out_summary(),
        options=run.config.to_dict(),
    )
