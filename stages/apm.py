"""The Asynchronous Perception Machine student (Modi & Rawat, NeurIPS 2024).

One convolutional "filter" folds the whole image into one trigger column ``T``; a fixed 2-D sin/cos code
``p(i, j)`` names every token location of the teacher's layout (prefix tokens get codes of their own); one
shared MLP maps each query ``[T, p]`` to the teacher's tokens at that location, for every cached level, and
(optionally) to the location's pixels. Locations are independent queries: any subset, in any order.

Queries: ``query="paper"`` is the paper's ``[T, p]``. ``query="local"`` joins the queried cell's own pixels
(:func:`local_read`; prefix queries read zeros): the shared MLP no longer has to look a location's own detail up
inside one global column, which is where a plain ``[T, p]`` loses the fit of patch tokens.

Levels: by default one linear head per level on the shared trunk (``level_mode="heads"``): the trunk runs
once per location for all levels. ``level_mode="query"`` instead appends a fixed level code to the query and
runs the trunk once per (location, level) with a single head; it needs equal token widths across levels.

Seams follow timm: :meth:`APM.forward_features` (trunk), :meth:`APM.forward_head`,
:meth:`APM.predict_tokens` (every location's tokens per level, chunked) and :meth:`APM.forward`. Heads predict
standardised tokens (:class:`TargetScale`, fitted on the training cache); `forward` also returns them in teacher units.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from apmpipe.storage.cache import CacheSpec
from apmpipe.storage.errors import ConfigError

LEVEL_MODES = ("heads", "query")
QUERY_MODES = ("paper", "local")


def sincos_2d(rows: torch.Tensor, cols: torch.Tensor, dim: int) -> torch.Tensor:
    """Fixed 2-D sinusoidal code: half the channels encode the row, half the column. ``[N] x 2 -> [N, dim]``."""
    assert dim % 4 == 0, "position code width must be a multiple of 4"
    quarter = dim // 4
    freqs = 1.0 / (10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    parts = []
    for coord in (rows, cols):
        angles = coord.double()[:, None] * freqs[None, :]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()


def location_codes(prefix_tokens: int, grid: tuple[int, int], dim: int) -> torch.Tensor:
    """Codes for every token of a layout ``[prefix + h*w, dim]``: prefix k sits at (-1-k, -1-k), grid row-major."""
    h, w = grid
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    prefix = -1 - torch.arange(prefix_tokens)
    return sincos_2d(torch.cat([prefix, rows]), torch.cat([prefix, cols]), dim)


@dataclass(frozen=True)
class APMConfig:
    """Architecture of the student; the layout fields come from the cache, the rest from the preset/options.

    Args:
        in_chans, image_size: the teacher's input.
        grid, prefix_tokens, level_dims: the teacher's token layout (shared grid) and width per cached level.
        trigger_channels: output channels of the conv filter; ``T`` has ``trigger_channels * h * w`` entries.
        pos_dim: width of the location code (0: as wide as ``T``, as in the paper).
        hidden: widths of the MLP trunk's layers.
        act: ``gelu`` or ``relu``.
        level_mode: ``heads`` (one head per level) or ``query`` (level code in the query).
        rgb: predict each grid location's pixels (the paper's f_rgb).
        query: ``paper`` (``[T, p]``) or ``local`` (``[T, p, the cell's own pixels]``). A saved config without the
            field is a ``paper`` student.
    """

    in_chans: int
    image_size: tuple[int, int]
    grid: tuple[int, int]
    prefix_tokens: int
    level_dims: tuple[int, ...]
    trigger_channels: int = 1
    pos_dim: int = 0
    hidden: tuple[int, ...] = (1024, 1024, 1024)
    act: str = "gelu"
    level_mode: str = "heads"
    rgb: bool = True
    query: str = "paper"

    def __post_init__(self) -> None:
        if self.query not in QUERY_MODES:
            raise ConfigError(f"--query {self.query!r} is not one of {', '.join(QUERY_MODES)}")
        if self.level_mode not in LEVEL_MODES:
            raise ConfigError(f"--level-mode {self.level_mode!r} is not one of {', '.join(LEVEL_MODES)}")
        if self.act not in ("gelu", "relu"):
            raise ConfigError(f"--act {self.act!r} is not gelu or relu")
        if self.level_mode == "query" and len(set(self.level_dims)) > 1:
            raise ConfigError(
                f"--level-mode query needs equal token widths across levels, got {self.level_dims}; use "
                "--level-mode heads"
            )
        if not self.hidden or min(self.hidden) < 1:
            raise ConfigError(f"--hidden needs at least one positive width, got {self.hidden}")

    @property
    def patch_size(self) -> tuple[int, int]:
        """The filter's kernel and stride: one cell of the teacher's grid (at least 1 pixel)."""
        return max(1, self.image_size[0] // self.grid[0]), max(1, self.image_size[1] // self.grid[1])

    @property
    def tiled_size(self) -> tuple[int, int]:
        """Input size the filter sees: the grid times the cell, equal to ``image_size`` when it tiles exactly."""
        return self.grid[0] * self.patch_size[0], self.grid[1] * self.patch_size[1]

    @property
    def trigger_dim(self) -> int:
        return self.trigger_channels * self.grid[0] * self.grid[1]

    @property
    def code_dim(self) -> int:
        width = self.pos_dim or self.trigger_dim
        return int(math.ceil(width / 4) * 4)

    @property
    def local_dim(self) -> int:
        """Width of a query's local read: one cell's pixels (0 for the paper's query)."""
        return self.in_chans * self.patch_size[0] * self.patch_size[1] if self.query == "local" else 0

    @property
    def num_tokens(self) -> int:
        return self.prefix_tokens + self.grid[0] * self.grid[1]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> APMConfig:
        known = {f.name for f in fields(cls)}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
        return cls(**{"query": "paper", **values})  # saved before queries could read their cell


PRESETS: dict[str, dict[str, Any]] = {
    # the authors' released model: 1-channel filter, code as wide as T, ReLU MLP 4096-4096-4096-2048-1024
    "paper": {"trigger_channels": 1, "pos_dim": 0, "hidden": (4096, 4096, 4096, 2048, 1024), "act": "relu"},
    "base": {"trigger_channels": 4, "pos_dim": 512, "hidden": (1024, 1024, 1024), "act": "gelu"},
    "small": {"trigger_channels": 2, "pos_dim": 256, "hidden": (512, 512, 512), "act": "gelu"},
    "tiny": {"trigger_channels": 1, "pos_dim": 64, "hidden": (128, 128), "act": "gelu"},
}


def config_for_cache(spec: CacheSpec, preset: str = "small", **overrides: Any) -> APMConfig:
    """Size the student from a cache's layout (grid, widths, input) and a preset, with explicit overrides."""
    if preset not in PRESETS:
        raise ConfigError(f"--preset {preset!r} is not one of {', '.join(PRESETS)}")
    grids = {level.grid for level in spec.levels}
    prefixes = {level.prefix_tokens for level in spec.levels}
    if len(grids) > 1 or len(prefixes) > 1:
        raise ConfigError(
            f"the cached levels have different grids {sorted(grids)}; the student needs one grid: extract "
            "layers of one stage (e.g. ViT blocks)"
        )
    c, h, w = spec.pixel_shape
    base = APMConfig(
        in_chans=c,
        image_size=(h, w),
        grid=next(iter(grids)),
        prefix_tokens=next(iter(prefixes)),
        level_dims=tuple(level.dim for level in spec.levels),
        **PRESETS[preset],
    )
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


class MLP(nn.Module):
    """The shared trunk: Linear + activation per hidden width. ``[..., in] -> [..., hidden[-1]]``."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...], act_layer: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(in_dim, width), act_layer()]
            in_dim = width
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def gather_locations(values: torch.Tensor, locations: torch.Tensor | None) -> torch.Tensor:
    """Rows of a per-location table ``[T, ...]`` for ``locations`` (None: all ``[T, ...]``; ``[L]``; ``[B, L]``)."""
    return values if locations is None else values[locations]


def local_read(
    values: torch.Tensor, grid: tuple[int, int], prefix_tokens: int, locations: torch.Tensor | None
) -> torch.Tensor:
    """Each queried location's own cell of ``values`` ``[B, C, H, W]`` (images, or any map a whole number of grid
    cells) -> ``[B, L, C*ch*cw]``; prefix locations (CLS, registers) read zeros. ``locations`` index the layout's
    tokens (prefix first, then the grid row-major): ``[L]`` shared, ``[B, L]`` per image, None for all."""
    b, c, height, width = values.shape
    cells = patch_pixels(values, (height // grid[0], width // grid[1]))  # [B, h*w, D]
    cells = torch.cat([cells.new_zeros(b, prefix_tokens, cells.shape[-1]), cells], dim=1)  # [B, T, D]
    if locations is None:
        return cells
    if locations.dim() == 1:
        return cells[:, locations]
    return cells.gather(1, locations[..., None].expand(-1, -1, cells.shape[-1]))


class TargetScale(nn.Module):
    """One level's target standardisation: ``z = (token - mean[loc]) / std[loc]`` and back.

    ``mean`` is the training cache's mean token per location; ``std`` is per channel, pooled over the grid for
    patch tokens and per location for each prefix token (CLS, registers), so high-norm tokens and channels do
    not dominate the loss. ``baseline`` is the mean token per location whether or not targets are standardised
    (the constant predictor evaluation compares against). All are buffers saved with the student.
    """

    def __init__(self, num_tokens: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_tokens, dim))
        self.register_buffer("std", torch.ones(num_tokens, dim))
        self.register_buffer("baseline", torch.zeros(num_tokens, dim))

    @torch.no_grad()
    def fit(self, mean: torch.Tensor, variance: torch.Tensor, prefix_tokens: int, standardize: bool = True) -> None:
        """Set from per-location moments ``[T, D]`` (see ``apmpipe.storage.cache.TokenMoments``); ``standardize=False``
        keeps the identity (raw targets) and records only the baseline."""
        self.baseline.copy_(mean)
        if not standardize:
            return
        std = variance.clone()
        std[prefix_tokens:] = variance[prefix_tokens:].mean(0, keepdim=True)
        std = std.sqrt()
        floor = 1e-3 * float(std.mean()) + 1e-12  # constant channels: no division blow-up
        self.mean.copy_(mean)
        self.std.copy_(std.clamp(min=floor))

    def standardize(self, tokens: torch.Tensor, locations: torch.Tensor | None) -> torch.Tensor:
        return (tokens.float() - gather_locations(self.mean, locations)) / gather_locations(self.std, locations)

    def restore(self, z: torch.Tensor, locations: torch.Tensor | None) -> torch.Tensor:
        return z * gather_locations(self.std, locations) + gather_locations(self.mean, locations)


class APM(nn.Module):
    """Conv filter -> trigger column T; queries [T, p(loc) (, level code)] -> shared MLP -> level tokens (+ rgb)."""

    def __init__(self, config: APMConfig) -> None:
        super().__init__()
        self.config = config
        self.filter = nn.Conv2d(
            config.in_chans, config.trigger_channels, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.register_buffer(
            "codes", location_codes(config.prefix_tokens, config.grid, config.code_dim), persistent=False
        )
        levels = len(config.level_dims)
        query_dim = config.trigger_dim + config.code_dim + config.local_dim
        if config.level_mode == "query":
            self.register_buffer(
                "level_codes", sincos_2d(torch.arange(levels), torch.arange(levels), 16), persistent=False
            )
            query_dim += 16
        self.trunk = MLP(query_dim, config.hidden, nn.ReLU if config.act == "relu" else nn.GELU)
        width = config.hidden[-1]
        head_count = 1 if config.level_mode == "query" else levels
        self.heads = nn.ModuleList(nn.Linear(width, config.level_dims[i]) for i in range(head_count))
        ph, pw = config.patch_size
        self.rgb_head = nn.Linear(width, config.in_chans * ph * pw) if config.rgb else None
        self.scales = nn.ModuleList(TargetScale(config.num_tokens, dim) for dim in config.level_dims)

    # -- parts -------------------------------------------------------------------------------------------------
    def fit_input(self, images: torch.Tensor) -> torch.Tensor:
        """Resize images whose size is not a whole number of grid cells (e.g. a 225 px input on a 15x15 grid)."""
        if tuple(images.shape[-2:]) == self.config.tiled_size:
            return images
        return F.interpolate(images, size=self.config.tiled_size, mode="bilinear", antialias=True, align_corners=False)

    def read(self, images: torch.Tensor, locations: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalised images -> trigger columns ``[B, trigger_dim]`` and the queried cells' local reads
        ``[B, L, local_dim]`` (None for the paper's query)."""
        images = self.fit_input(images)
        trigger = self.filter(images).flatten(1)
        if self.config.query == "paper":
            return trigger, None
        return trigger, local_read(images, self.config.grid, self.config.prefix_tokens, locations)

    def queries(
        self,
        trigger: torch.Tensor,
        locations: torch.Tensor | None,
        level: int | None = None,
        local: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[B, Dt]`` and locations (``[L]`` shared or ``[B, L]`` per image; None = all) -> queries ``[B, L, Dq]``;
        ``local`` ``[B, L, local_dim]``: the cells' own reads, joined last."""
        b = trigger.shape[0]
        if locations is None:
            codes = self.codes.expand(b, -1, -1)
        elif locations.dim() == 1:
            codes = self.codes[locations].expand(b, -1, -1)
        else:
            codes = self.codes[locations]
        parts = [trigger[:, None, :].expand(-1, codes.shape[1], -1), codes]
        if level is not None:
            parts.append(self.level_codes[level].expand(b, codes.shape[1], -1))
        if local is not None:
            parts.append(local.to(trigger.dtype))
        return torch.cat(parts, dim=-1)

    # -- timm-style seams ------------------------------------------------------------------------------------
    def forward_features(
        self, images: torch.Tensor, locations: torch.Tensor | None = None, level: int | None = None
    ) -> torch.Tensor:
        """Trunk features ``[B, L, hidden[-1]]`` for the queried locations (and level in query mode)."""
        trigger, local = self.read(images, locations)
        return self.trunk(self.queries(trigger, locations, level, local))

    def forward_head(self, features: torch.Tensor, level: int | None = None) -> list[torch.Tensor]:
        """Trunk features -> standardised tokens: one ``[B, L, D_l]`` per level, or only ``level``'s."""
        if self.config.level_mode == "query":
            return [self.heads[0](features)]
        heads = self.heads if level is None else [self.heads[level]]
        return [head(features) for head in heads]

    def forward(self, images: torch.Tensor, locations: torch.Tensor | None = None) -> dict[str, Any]:
        """For the queried locations: ``standardized`` and ``tokens`` (teacher units), one ``[B, L, D_l]`` per level,
        and, if enabled, ``rgb`` ``[B, L, C*ph*pw]``."""
        if self.config.level_mode == "query":
            trigger, local = self.read(images, locations)
            features = [
                self.trunk(self.queries(trigger, locations, level, local))
                for level in range(len(self.config.level_dims))
            ]
            standardized = [self.heads[0](f) for f in features]
            rgb_features = features[-1]
        else:
            rgb_features = self.forward_features(images, locations)
            standardized = self.forward_head(rgb_features)
        tokens = [scale.restore(z.float(), locations) for scale, z in zip(self.scales, standardized, strict=True)]
        rgb = self.rgb_head(rgb_features) if self.rgb_head is not None else None
        return {"standardized": standardized, "tokens": tokens, "rgb": rgb}

    @torch.no_grad()
    def predict_tokens(self, images: torch.Tensor, chunk: int = 256) -> list[torch.Tensor]:
        """Every location's predicted teacher tokens per level ``[B, T, D_l]``, queried ``chunk`` locations at a time
        (memory does not grow with the grid)."""
        outs: list[list[torch.Tensor]] = [[] for _ in self.config.level_dims]
        for start in range(0, self.config.num_tokens, chunk):
            locations = torch.arange(start, min(start + chunk, self.config.num_tokens), device=images.device)
            for i, tokens in enumerate(self.forward(images, locations)["tokens"]):
                outs[i].append(tokens)
        return [torch.cat(parts, dim=1) for parts in outs]

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """Fresh random weights (seeded), keeping the target standardisation: a student trained from scratch."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Conv2d)):
                    module.reset_parameters()

    # -- bookkeeping -----------------------------------------------------------------------------------------
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_image(self) -> int:
        """Multiply-adds x 2 for one image with every location queried."""
        cfg = self.config
        macs = cfg.in_chans * cfg.trigger_channels * cfg.patch_size[0] * cfg.patch_size[1] * cfg.grid[0] * cfg.grid[1]
        trunk = sum(m.in_features * m.out_features for m in self.trunk.modules() if isinstance(m, nn.Linear))
        heads = sum(h.in_features * h.out_features for h in self.heads)
        passes = len(cfg.level_dims) if cfg.level_mode == "query" else 1
        rgb = self.rgb_head.in_features * self.rgb_head.out_features if self.rgb_head is not None else 0
        macs += cfg.num_tokens * (passes * (trunk + heads) + rgb)
        return 2 * macs


def patch_pixels(
    images: torch.Tensor, patch_size: tuple[int, int], grid_locations: torch.Tensor | None = None
) -> torch.Tensor:
    """Pixels of grid cells (the rgb target): images ``[B, C, H, W]`` -> ``[B, L, C*ph*pw]`` for ``grid_locations``
    ``[B, L]`` (row-major cell indices; None: every cell). Only the queried cells are copied."""
    b, c, height, width = images.shape
    ph, pw = patch_size
    h, w = height // ph, width // pw
    cells = images.view(b, c, h, ph, w, pw)
    if grid_locations is None:
        return cells.permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, c * ph * pw)
    batch = torch.arange(b, device=images.device)[:, None]
    picked = cells[batch, :, grid_locations // w, :, grid_locations % w, :]  # [B, L, C, ph, pw]
    return picked.reshape(b, grid_locations.shape[1], c * ph * pw)
