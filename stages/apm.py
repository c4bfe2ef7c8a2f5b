"""The Asynchronous Perception Machine student (Modi & Rawat, NeurIPS 2024).

One convolutional "filter" folds the whole image into one trigger column ``T`` (optionally followed by a small
MLP applied to each of its cells on its own: ``filter_layers``); a 2-D sin/cos code ``p(i, j)`` (fixed as in
the paper, or learned from it: ``pos_code``) names every token location of the teacher's layout (prefix tokens get
codes of their own); one shared MLP (plain, or with pre-norm residual layers: ``trunk``) maps each query ``[T, p]``
to the teacher's tokens at that location, for every cached level, and (optionally) to the location's pixels.
Locations are independent queries: any subset, in any order.

Grids: when every level shares one grid (a ViT's blocks) a location is one query for all levels. When levels
lie on different grids (a ConvNet's or Swin's stages) each level is queried at its own grid's cell centres,
as continuous coordinates in units of the finest grid (the filter's cell); ``locations`` is then one index
tensor per level.

Queries: ``query="paper"`` is the paper's ``[T, p]``. ``query="local"`` joins the queried cell's own pixels
(:func:`local_read`; prefix queries read zeros): the shared MLP no longer has to look a location's own detail up
inside one global column, which is where a plain ``[T, p]`` loses the fit of patch tokens.

Mixer: ``mixer_blocks > 0`` runs transformer blocks over the filter's cells (:class:`CellMixer`); ``T`` is then the
mixed cells' mean, read with the same weights whatever the image's layout, and each grid query also reads its own
mixed cell. The paper's ``T`` (every cell's output side by side, a weight per cell in the trunk's first layer) is what
over-fits a small cache's per-image summary (the CLS token, the grid's mean); a few of its channels beside the mean
(``trigger_cells``) fit patch tokens better, and from the first steps, at that cost (docs/train.md).

Levels: by default one linear head per level on the shared trunk (``level_mode="heads"``): the trunk runs
once per location for all levels. ``level_mode="query"`` instead appends a fixed level code to the query and
runs the trunk once per (location, level) with a single head; it needs equal token widths across levels.

Seams follow timm: :meth:`APM.forward_features` (trunk), :meth:`APM.forward_head`,
:meth:`APM.predict_tokens` (every location's tokens per level, chunked) and :meth:`APM.forward`. Heads predict
standardised tokens (:class:`TargetScale`, fitted on the training cache); `forward` also returns them in teacher units.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from apmpipe.storage.errors import AT_LEAST_ONE, NON_NEGATIVE, ConfigError, Range, check_choice, check_ranges
from apmpipe.storage.format import CacheSpec

HEAD_WIDTH = 32  # channels per attention head of the cell mixer
DROPOUTS = Range(0, 0.9)  # --mixer-dropout: 1 would drop every activation
LEVEL_MODES = ("heads", "query")
Locations = torch.Tensor | list[torch.Tensor | None] | None  # shared by every level, or one entry per level
QUERY_MODES = ("paper", "local")
DEFAULT_QUERY = "local"  # the query train and config_for_cache build when none is named (docs/train.md)
TRUNKS = ("mlp", "residual")
POS_CODES = ("fixed", "learned")
# fields added after students were first saved: a saved config without one had this value (and saves without it)
LEGACY_VALUES: dict[str, Any] = {
    "query": "paper",
    "level_grids": (),
    "level_prefix_tokens": (),
    "filter_layers": 1,
    "filter_width": 0,
    "trunk": "mlp",
    "pos_code": "fixed",
    "mixer_blocks": 0,
    "mixer_width": 128,
    "trigger_cells": 0,
    "mixer_dropout": 0.0,
}


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


def cell_centres(cells: int, finest: int) -> torch.Tensor:
    """Centres of ``cells`` equal cells along an axis of ``finest`` cells, in units of the finest cell:
    ``(i + 0.5) * finest / cells - 0.5`` (float64; exactly ``i`` when ``cells == finest``)."""
    return (torch.arange(cells, dtype=torch.float64) + 0.5) * (finest / cells) - 0.5


def location_codes(
    prefix_tokens: int, grid: tuple[int, int], dim: int, finest: tuple[int, int] | None = None
) -> torch.Tensor:
    """Codes for every token of a layout ``[prefix + h*w, dim]``: prefix k sits at (-1-k, -1-k), grid row-major
    at its cell centres in units of the ``finest`` grid (default: ``grid`` itself, cell ``(i, j)`` at ``(i, j)``)."""
    h, w = grid
    fh, fw = finest or grid
    rows = cell_centres(h, fh).repeat_interleave(w)
    cols = cell_centres(w, fw).repeat(h)
    prefix = -1.0 - torch.arange(prefix_tokens, dtype=torch.float64)
    return sincos_2d(torch.cat([prefix, rows]), torch.cat([prefix, cols]), dim)


@dataclass(frozen=True)
class APMConfig:
    """Architecture of the student; the layout fields come from the cache, the rest from the preset/options.

    Args:
        in_chans, image_size: the teacher's input.
        grid, prefix_tokens, level_dims: the teacher's token layout and width per cached level; ``grid`` is the
            finest level's grid (the filter's cells) and ``prefix_tokens`` that level's prefix count.
        level_grids, level_prefix_tokens: each level's grid and prefix count when they differ between levels
            (a hierarchical teacher); empty: every level on ``grid`` with ``prefix_tokens``.
        trigger_channels: output channels of the filter; without a mixer ``T`` has ``trigger_channels * h * w`` entries.
        filter_layers: the filter's layers: 1 is the paper's one linear conv (kernel = stride = one cell); ``n > 1``
            follows it with GELU and ``n - 1`` 1x1 convs, each followed by GELU: a small MLP on each cell's pixels
            alone (cells still do not see each other; ``T`` carries nonlinear features of every cell).
        filter_width: width of the filter's inner layers when ``filter_layers > 1`` (0: ``trigger_channels``).
        mixer_blocks: pre-norm transformer blocks (:func:`mixer_block`) mixing the filter's cells, each with every other
            (0: none, the paper). With a mixer ``T`` is the mean of the mixed cells (``mixer_width`` entries, read with
            the same weights for every cell) instead of every cell's output side by side, and each grid query's
            local read also takes its own cell of the mixed map (prefix queries read zeros); it needs the ``local``
            query. Measured on the harder ViT: the absolute read of ``T`` is where CLS over-fits (docs/train.md).
        mixer_width: the mixer's token width (a multiple of 32: one attention head per 32 channels).
        trigger_cells: with a mixer, ``T`` also carries this many of every cell's filter output channels, cells side
            by side (the paper's ``T``, narrowed), after the mixed cells' mean (0: the mean alone; at most
            ``trigger_channels``). Without a mixer ``T`` is every channel of every cell.
        mixer_dropout: dropout inside the mixer's blocks while training (attention weights, the attention's and the
            MLP's outputs, the MLP's hidden layer; 0: none): a regulariser against learning few images' summaries.
            ``train`` holds it off until its warmup ends and test-time training never turns it on
            (:meth:`APM.drop_in_mixer`).
        pos_dim: width of the location code (0: as wide as ``T``, as in the paper).
        pos_code: ``fixed`` (the paper's 2-D sin/cos code) or ``learned`` (a table of one code per token location,
            starting from the sin/cos code and trained with the student, as a ViT's position embedding).
        hidden: widths of the MLP trunk's layers.
        trunk: ``mlp`` (Linear + activation per width, as in the paper) or ``residual`` (every layer after the first
            adds to its input through LayerNorm and the activation, as a transformer's MLP blocks, where the widths
            allow).
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
    level_grids: tuple[tuple[int, int], ...] = ()
    level_prefix_tokens: tuple[int, ...] = ()
    filter_layers: int = 1
    filter_width: int = 0
    trunk: str = "mlp"
    pos_code: str = "fixed"
    mixer_blocks: int = 0
    mixer_width: int = 128
    trigger_cells: int = 0
    mixer_dropout: float = 0.0

    RANGES: ClassVar[dict[str, Range]] = {
        "filter_layers": AT_LEAST_ONE,
        "filter_width": NON_NEGATIVE,
        "mixer_blocks": NON_NEGATIVE,
        "mixer_width": AT_LEAST_ONE,
        "trigger_cells": NON_NEGATIVE,
        "mixer_dropout": DROPOUTS,
    }

    def __post_init__(self) -> None:
        object.__setattr__(self, "level_grids", tuple(tuple(g) for g in self.level_grids))
        check_choice("--query", self.query, QUERY_MODES)
        check_choice("--level-mode", self.level_mode, LEVEL_MODES)
        if self.act not in ("gelu", "relu"):
            raise ConfigError(f"--act {self.act!r} is not gelu or relu")
        if self.level_mode == "query" and not self.one_grid:
            raise ConfigError(
                f"--level-mode query needs one grid for every level, got {list(self.grids)}; use --level-mode heads"
            )
        if self.level_mode == "query" and len(set(self.level_dims)) > 1:
            raise ConfigError(
                f"--level-mode query needs equal token widths across levels, got {self.level_dims}; use "
                "--level-mode heads"
            )
        check_ranges(vars(self), self.RANGES)
        if not self.hidden or min(self.hidden) < 1:
            raise ConfigError(f"--hidden needs at least one positive width, got {self.hidden}")
        check_choice("--pos-code", self.pos_code, POS_CODES)
        check_choice("--trunk", self.trunk, TRUNKS)
        if self.mixer_blocks and self.query != "local":
            raise ConfigError(
                "--mixer-blocks needs --query local (a grid query reads its own mixed cell); use --mixer-blocks 0"
            )
        if self.mixer_blocks and self.mixer_width % HEAD_WIDTH:
            raise ConfigError(f"--mixer-width must be a multiple of {HEAD_WIDTH}, got {self.mixer_width}")
        if self.trigger_cells and not self.mixer_blocks:
            raise ConfigError(
                "--trigger-cells needs a cell mixer (without one T holds every channel of every cell); add "
                "--mixer-blocks 1 or drop --trigger-cells"
            )
        if self.mixer_dropout and not self.mixer_blocks:
            raise ConfigError("--mixer-dropout needs a cell mixer; add --mixer-blocks 1 or drop --mixer-dropout")
        if self.trigger_cells > self.trigger_channels:
            raise ConfigError(
                f"--trigger-cells {self.trigger_cells} is more than the filter's {self.trigger_channels} channels; "
                f"use at most --trigger-cells {self.trigger_channels}"
            )

    @property
    def one_grid(self) -> bool:
        """Every level on one grid with the same prefix tokens: a location is one query for all levels."""
        return not self.level_grids

    @property
    def grids(self) -> tuple[tuple[int, int], ...]:
        """Each level's grid."""
        return self.level_grids or (self.grid,) * len(self.level_dims)

    @property
    def prefixes(self) -> tuple[int, ...]:
        """Each level's prefix token count."""
        return self.level_prefix_tokens or (self.prefix_tokens,) * len(self.level_dims)

    def level_tokens(self, level: int) -> int:
        """Tokens of one level's layout: its prefix tokens plus its grid."""
        h, w = self.grids[level]
        return self.prefixes[level] + h * w

    @property
    def finest_level(self) -> int:
        """The first level on the finest grid (its queries predict the pixels)."""
        return self.grids.index(self.grid)

    @property
    def patch_size(self) -> tuple[int, int]:
        """The filter's kernel and stride: one cell of the teacher's grid (at least 1 pixel)."""
        return max(1, self.image_size[0] // self.grid[0]), max(1, self.image_size[1] // self.grid[1])

    @property
    def tiled_size(self) -> tuple[int, int]:
        """Input size the filter sees: the grid times the cell, equal to ``image_size`` when it tiles exactly."""
        return self.grid[0] * self.patch_size[0], self.grid[1] * self.patch_size[1]

    @property
    def filter_widths(self) -> tuple[int, ...]:
        """Output channels of each of the filter's layers (the last is ``trigger_channels``)."""
        inner = self.filter_width or self.trigger_channels
        return (inner,) * (self.filter_layers - 1) + (self.trigger_channels,)

    @property
    def trigger_dim(self) -> int:
        """Entries of ``T``: every cell's filter output side by side; with a mixer the mixed cells' mean, then
        ``trigger_cells`` channels of every cell."""
        cells = self.grid[0] * self.grid[1]
        return self.mixer_width + self.trigger_cells * cells if self.mixer_blocks else self.trigger_channels * cells

    @property
    def code_dim(self) -> int:
        width = self.pos_dim or self.trigger_dim
        return int(math.ceil(width / 4) * 4)

    @property
    def local_dim(self) -> int:
        """Width of a query's local read: one cell's pixels and, with a mixer, its mixed cell (0: the paper's query)."""
        if self.query != "local":
            return 0
        return self.in_chans * self.patch_size[0] * self.patch_size[1] + (self.mixer_width if self.mixer_blocks else 0)

    @property
    def num_tokens(self) -> int:
        return self.prefix_tokens + self.grid[0] * self.grid[1]

    def to_dict(self) -> dict[str, Any]:
        """As saved with students and checkpoints: a one-grid config leaves the per-level layout out and a paper
        query its ``query``, so such students save exactly what they did before those fields existed."""
        return {k: v for k, v in asdict(self).items() if LEGACY_VALUES.get(k, object()) != v}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> APMConfig:
        known = {f.name for f in fields(cls)}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
        return cls(**{**LEGACY_VALUES, **values})


PRESETS: dict[str, dict[str, Any]] = {
    # the authors' released model: 1-channel filter, code as wide as T, ReLU MLP 4096-4096-4096-2048-1024
    "paper": {"trigger_channels": 1, "pos_dim": 0, "hidden": (4096, 4096, 4096, 2048, 1024), "act": "relu"},
    "base": {"trigger_channels": 4, "pos_dim": 512, "hidden": (1024, 1024, 1024), "act": "gelu"},
    # a 3-layer filter (one conv, then two 1x1 layers per cell, width 128) with 32 output channels, one mixer block
    # (teachers on one grid, --query local: :func:`config_for_cache`), a residual trunk and learned location codes:
    # measured on the demo's harder ViT teacher (docs/train.md); the default student
    "small": {
        "trigger_channels": 32,
        "filter_layers": 3,
        "filter_width": 128,
        "mixer_blocks": 1,
        "pos_dim": 256,
        "pos_code": "learned",
        "hidden": (512, 512, 512),
        "trunk": "residual",
        "act": "gelu",
    },
    "tiny": {"trigger_channels": 1, "pos_dim": 64, "hidden": (128, 128), "act": "gelu"},
}


def config_for_cache(spec: CacheSpec, preset: str = "small", query: str = DEFAULT_QUERY, **overrides: Any) -> APMConfig:
    """Size the student from a cache's layout (grid, widths, input), a preset and a query (``local``, as ``train``
    defaults to), with explicit overrides (None: the preset's). A preset's mixer applies to a layout on one grid
    with ``query`` local: on a hierarchical teacher it would attend over the finest grid (a ConvNeXt's 16x16 cells
    took a CPU step to 2.8x) with its effect there unmeasured, and a paper query cannot read a mixed cell;
    ``mixer_blocks`` given explicitly is kept."""
    check_choice("--preset", preset, PRESETS)
    grids = tuple(level.grid for level in spec.levels)
    prefixes = tuple(level.prefix_tokens for level in spec.levels)
    finest = max(range(len(grids)), key=lambda i: (grids[i][0] * grids[i][1], -i))
    one_grid = len(set(zip(grids, prefixes, strict=True))) == 1
    c, h, w = spec.pixel_shape
    options = dict(PRESETS[preset])
    if not one_grid or query != "local":
        options["mixer_blocks"] = 0
    options.update({k: v for k, v in overrides.items() if v is not None})
    return APMConfig(
        query=query,
        in_chans=c,
        image_size=(h, w),
        grid=grids[finest],
        prefix_tokens=prefixes[finest],
        level_dims=tuple(level.dim for level in spec.levels),
        level_grids=() if one_grid else grids,
        level_prefix_tokens=() if one_grid else prefixes,
        **options,
    )


class MLP(nn.Module):
    """The shared trunk: Linear + activation per hidden width. ``[..., in] -> [..., hidden[-1]]``.

    ``residual``: each layer after the first is a pre-norm block ``Linear(act(LayerNorm(x)))`` that adds its input
    back where its width is the input's (a residual block; a narrowing layer has no skip), and the trunk ends in
    ``act(LayerNorm(x))``; the Linear layers keep their places in ``layers`` either way."""

    def __init__(
        self, in_dim: int, hidden: tuple[int, ...], act_layer: type[nn.Module] = nn.GELU, residual: bool = False
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(in_dim, width), act_layer()]
            in_dim = width
        self.layers = nn.Sequential(*layers)
        self.norms = nn.ModuleList(nn.LayerNorm(width) for width in hidden) if residual else None

    @property
    def first(self) -> nn.Linear:
        """The first linear layer (the one the query enters)."""
        return self.layers[0]

    def after_first(self, x: torch.Tensor) -> torch.Tensor:
        """The trunk after its first linear layer: ``[..., hidden[0]] -> [..., hidden[-1]]``."""
        if self.norms is None:
            return self.layers[1:](x)
        act = self.layers[1]
        for norm, linear in zip(self.norms, self.layers[2::2], strict=False):
            update = linear(act(norm(x)))
            x = x + update if update.shape == x.shape else update
        return act(self.norms[-1](x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.after_first(self.first(x))


def cell_mlp(widths: tuple[int, ...]) -> nn.Sequential:
    """The filter's layers after its first conv: GELU, then a 1x1 conv + GELU to each next width (each cell alone)."""
    layers: list[nn.Module] = [nn.GELU()]
    for width_in, width_out in itertools.pairwise(widths):
        layers += [nn.Conv2d(width_in, width_out, kernel_size=1), nn.GELU()]
    return nn.Sequential(*layers)


def mixer_block(width: int, dropout: float = 0.0) -> nn.TransformerEncoderLayer:
    """One pre-norm transformer block (torch's own: training never imports timm): attention with a head per 32
    channels, then a GELU MLP twice as wide, with torch's dropout of ``dropout`` in its four places."""
    return nn.TransformerEncoderLayer(
        width,
        width // HEAD_WIDTH,
        dim_feedforward=2 * width,
        dropout=dropout,
        activation="gelu",
        batch_first=True,
        norm_first=True,
    )


class CellMixer(nn.Module):
    """Transformer blocks over the filter's cells (a learned position embedding per cell, :func:`mixer_block` each, a
    final LayerNorm): ``[B, C, h, w] -> [B, width, h, w]``, every cell informed by every other."""

    def __init__(self, channels: int, cells: int, width: int, blocks: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Linear(channels, width)
        self.pos = nn.Parameter(torch.zeros(1, cells, width))
        self.blocks = nn.Sequential(*(mixer_block(width, dropout) for _ in range(blocks)))
        self.norm = nn.LayerNorm(width)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The parameters that are not a Linear's or a LayerNorm's (those reset themselves): the position embedding
        and the attention's joint input projection (as torch's MultiheadAttention starts it)."""
        nn.init.trunc_normal_(self.pos, std=0.02)
        for block in self.blocks:
            nn.init.xavier_uniform_(block.self_attn.in_proj_weight)
            nn.init.zeros_(block.self_attn.in_proj_bias)

    def set_dropout(self, p: float) -> None:
        """Every block's dropout probability, in its four places (takes effect in training mode only)."""
        for block in self.blocks:
            block.dropout.p = block.dropout1.p = block.dropout2.p = p
            block.self_attn.dropout = p

    def forward(self, cells: torch.Tensor) -> torch.Tensor:
        b, _, h, w = cells.shape
        x = self.norm(self.blocks(self.embed(cells.flatten(2).transpose(1, 2)) + self.pos))
        return x.transpose(1, 2).reshape(b, -1, h, w)

    def macs(self, cells: int) -> int:
        """Multiply-adds for one image: the embedding, then per block qkv + projection (4w²) and the MLP (4w²) per
        cell, and attention's two products (2·cells²·w)."""
        width = self.pos.shape[-1]
        channels = self.embed.in_features
        return cells * channels * width + len(self.blocks) * (8 * cells * width * width + 2 * cells * cells * width)


def gather_locations(values: torch.Tensor, locations: torch.Tensor | None) -> torch.Tensor:
    """Rows of a per-location table ``[T, ...]`` for ``locations`` (None: all ``[T, ...]``; ``[L]``; ``[B, L]``)."""
    return values if locations is None else values[locations]


def local_read(
    values: torch.Tensor,
    grid: tuple[int, int],
    prefix_tokens: int,
    locations: torch.Tensor | None,
    cell: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Each queried location's own cell of ``values`` ``[B, C, H, W]`` (images, or any map a whole number of grid
    cells) -> ``[B, L, C*ch*cw]``; prefix locations (CLS, registers) read zeros. ``locations`` index the layout's
    tokens (prefix first, then the grid row-major): ``[L]`` shared, ``[B, L]`` per image, None for all. ``cell``
    (ch, cw): the read's size per cell (default: the grid's own cells); a grid coarser than that (a ConvNet's
    deeper stage) reads its cells area-averaged down to it, so every level's queries have one width."""
    b, c, height, width = values.shape
    ch, cw = cell or (height // grid[0], width // grid[1])
    if (height, width) != (grid[0] * ch, grid[1] * cw):
        values = F.adaptive_avg_pool2d(values, (grid[0] * ch, grid[1] * cw))
    cells = patch_pixels(values, (ch, cw))  # [B, h*w, D]
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
        """Set from per-location moments ``[T, D]`` (see ``apmpipe.storage.moments.TokenMoments``);
        ``standardize=False`` keeps the identity (raw targets) and records only the baseline."""
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
        widths = config.filter_widths
        self.filter = nn.Conv2d(config.in_chans, widths[0], kernel_size=config.patch_size, stride=config.patch_size)
        self.cell_mlp = cell_mlp(widths) if len(widths) > 1 else None
        cells = config.grid[0] * config.grid[1]
        self.mixer = (
            CellMixer(config.trigger_channels, cells, config.mixer_width, config.mixer_blocks, config.mixer_dropout)
            if config.mixer_blocks
            else None
        )
        tables = self.code_tables()
        if config.pos_code == "learned":
            self.codes = nn.Parameter(torch.cat(tables))
        else:
            self.register_buffer("codes", torch.cat(tables), persistent=False)
        starts = [0, *itertools.accumulate(len(t) for t in tables)]
        self.code_spans = list(itertools.pairwise(starts))  # rows of each level's table in codes (one: shared)
        levels = len(config.level_dims)
        level_code_dim = 16 if config.level_mode == "query" else 0
        if level_code_dim:
            self.register_buffer(
                "level_codes", sincos_2d(torch.arange(levels), torch.arange(levels), level_code_dim), persistent=False
            )
        # widths of the query's parts, in the order the first layer's weight columns take them
        self.query_widths = (config.trigger_dim, config.code_dim, level_code_dim, config.local_dim)
        self.trunk = MLP(
            sum(self.query_widths),
            config.hidden,
            nn.ReLU if config.act == "relu" else nn.GELU,
            residual=config.trunk == "residual",
        )
        width = config.hidden[-1]
        head_count = 1 if config.level_mode == "query" else levels
        self.heads = nn.ModuleList(nn.Linear(width, config.level_dims[i]) for i in range(head_count))
        ph, pw = config.patch_size
        self.rgb_head = nn.Linear(width, config.in_chans * ph * pw) if config.rgb else None
        self.scales = nn.ModuleList(TargetScale(config.level_tokens(i), dim) for i, dim in enumerate(config.level_dims))

    # -- parts -------------------------------------------------------------------------------------------------
    def code_tables(self) -> list[torch.Tensor]:
        """The sin/cos code of every token location, one table per grid (one: the shared grid): the fixed code, and
        the learned code's starting point."""
        cfg = self.config
        layouts = [(cfg.prefix_tokens, cfg.grid)] if cfg.one_grid else zip(cfg.prefixes, cfg.grids, strict=True)
        return [location_codes(prefix, grid, cfg.code_dim, cfg.grid) for prefix, grid in layouts]

    def no_weight_decay(self) -> set[str]:
        """Parameters AdamW leaves undecayed besides biases and norms (timm's convention): the learned codes and the
        mixer's position embedding."""
        exempt = {"codes"} if self.config.pos_code == "learned" else set()
        return exempt | {"mixer.pos"} if self.mixer is not None else exempt

    def drop_in_mixer(self, active: bool) -> None:
        """Turn the mixer's training dropout on (at ``config.mixer_dropout``) or off. A student starts with it on;
        ``train`` holds it off until its warmup ends (dropout from the first step took a 150-step run from 0.93x to
        0.77x its teacher's top-1, docs/train.md)."""
        if self.mixer is not None:
            self.mixer.set_dropout(self.config.mixer_dropout if active else 0.0)

    def fit_input(self, images: torch.Tensor) -> torch.Tensor:
        """Resize images whose size is not a whole number of grid cells (e.g. a 225 px input on a 15x15 grid)."""
        if tuple(images.shape[-2:]) == self.config.tiled_size:
            return images
        return F.interpolate(images, size=self.config.tiled_size, mode="bilinear", antialias=True, align_corners=False)

    def read(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Normalised images -> trigger columns ``[B, trigger_dim]`` and the maps the local reads take: the images
        fitted to the filter's cells and, with a mixer, the mixed cells ``[B, mixer_width, h, w]`` (none for the
        paper's query)."""
        images = self.fit_input(images)
        cells = self.trigger_map(images)
        if self.mixer is None:
            return cells.flatten(1), (images,) if self.config.query == "local" else ()
        mixed = self.mixer(cells)
        trigger = mixed.mean((2, 3))
        if self.config.trigger_cells:
            trigger = torch.cat([trigger, cells[:, : self.config.trigger_cells].flatten(1)], dim=1)
        return trigger, (images, mixed)

    def trigger_map(self, images: torch.Tensor) -> torch.Tensor:
        """Images fitted to the filter's cells -> the filter's output ``[B, trigger_channels, h, w]``."""
        cells = self.filter(images)
        return cells if self.cell_mlp is None else self.cell_mlp(cells)

    def local_at(
        self, maps: tuple[torch.Tensor, ...], level: int | None, locations: torch.Tensor | None
    ) -> torch.Tensor:
        """The local reads ``[B, L, local_dim]`` of ``level``'s grid (None: the shared grid) at ``locations``: each of
        :meth:`read`'s maps at its own cell size (the filter's cell for images, one value for the mixed cells)."""
        cfg = self.config
        shared = level is None or cfg.one_grid
        grid, prefix = (cfg.grid, cfg.prefix_tokens) if shared else (cfg.grids[level], cfg.prefixes[level])
        reads = [
            local_read(m, grid, prefix, locations, (m.shape[-2] // cfg.grid[0], m.shape[-1] // cfg.grid[1]))
            for m in maps
        ]
        return torch.cat(reads, dim=-1) if len(reads) > 1 else reads[0]

    def first_weights(self) -> tuple[torch.Tensor, ...]:
        """The trunk's first weight split by the query's parts (trigger, location code, level code, local read).
        Split once per forward and passed on: each split's backward writes the whole weight's gradient, so one split
        (not one per part and level) keeps the backward to one such write."""
        return self.trunk.first.weight.split(self.query_widths, dim=1)

    def trigger_share(self, trigger: torch.Tensor, weights: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The part of every query's first trunk layer that depends on the image alone: ``T`` through its columns of
        the first layer's weight (``weights`` from :meth:`first_weights`), with the bias,
        ``[B, Dt] -> [B, 1, hidden[0]]``; computed once per image and shared by all its locations and levels
        (:meth:`first_layer`)."""
        return F.linear(trigger, weights[0], self.trunk.first.bias)[:, None, :]

    def image_shares(
        self, images: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """What every query of ``images`` shares, for :meth:`first_layer`: the trigger's share
        (:meth:`trigger_share`), the first weight's parts (:meth:`first_weights`) and the local reads' maps
        (:meth:`read`)."""
        trigger, maps = self.read(images)
        weights = self.first_weights()
        return self.trigger_share(trigger, weights), weights, maps

    def first_layer(
        self,
        share: torch.Tensor,
        weights: tuple[torch.Tensor, ...],
        locations: torch.Tensor | None,
        level: int | None = None,
        maps: tuple[torch.Tensor, ...] = (),
    ) -> torch.Tensor:
        """The trunk's first linear layer ``[B, L, hidden[0]]`` on the queries ``[T, p(loc) (, level code) (, local
        read)]`` for the images' :meth:`trigger_share` and ``locations`` of ``level``'s grid (``[L]`` shared or
        ``[B, L]`` per image; None = all; ``level`` None: the shared grid), computed share by share: the trigger's
        once per image, the codes' once per location, only the local read (``maps`` from :meth:`read`) per query.
        The same sum as the layer on the joined query, without repeating ``T``'s multiply-adds for every location."""
        _, code_w, level_w, local_w = weights
        out = share + self.code_share(level, locations, code_w)
        if level is not None and self.config.level_mode == "query":
            out = out + F.linear(self.level_codes[level], level_w)
        if maps:
            out = out + F.linear(self.local_at(maps, level, locations).to(share.dtype), local_w)
        return out

    def code_share(self, level: int | None, locations: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor:
        """The location codes of ``level``'s grid through ``weight``: ``[1, L, H]`` (shared or all locations) or
        ``[B, L, H]`` (per image), projecting whichever is fewer, the queried codes or the level's table."""
        start, stop = self.code_spans[0 if level is None or self.config.one_grid else level]
        table = self.codes[start:stop]
        if locations is None:
            return F.linear(table, weight)[None]
        if locations.dim() == 1:
            return F.linear(table[locations], weight)[None]
        if locations.numel() < len(table):
            return F.linear(table[locations], weight)
        return F.linear(table, weight)[locations]

    def trunk_features(self, first: torch.Tensor) -> torch.Tensor:
        """The trunk after its first linear layer: ``[..., hidden[0]] -> [..., hidden[-1]]``."""
        return self.trunk.after_first(first)

    def level_locations(self, locations: Locations) -> list[torch.Tensor | None]:
        """``locations`` as one entry per level: a one-grid student's shared locations repeated, a multi-grid
        student's list as given (None: every location of every level)."""
        if isinstance(locations, (list, tuple)):
            return list(locations)
        if locations is not None and not self.config.one_grid:
            raise ValueError("a student on several grids takes one location tensor per level")
        return [locations] * len(self.config.level_dims)

    # -- timm-style seams ------------------------------------------------------------------------------------
    def forward_features(
        self, images: torch.Tensor, locations: torch.Tensor | None = None, level: int | None = None
    ) -> torch.Tensor:
        """Trunk features ``[B, L, hidden[-1]]`` for the queried locations of ``level``'s grid (None: the shared
        grid; in query mode the level's code is in the query)."""
        share, weights, maps = self.image_shares(images)
        return self.trunk_features(self.first_layer(share, weights, locations, level, maps))

    def forward_head(self, features: torch.Tensor, level: int | None = None) -> list[torch.Tensor]:
        """Trunk features -> standardised tokens: one ``[B, L, D_l]`` per level, or only ``level``'s."""
        if self.config.level_mode == "query":
            return [self.heads[0](features)]
        heads = self.heads if level is None else [self.heads[level]]
        return [head(features) for head in heads]

    def forward(self, images: torch.Tensor, locations: Locations = None) -> dict[str, Any]:
        """For the queried locations (one grid: ``[L]``/``[B, L]``/None shared by every level; several grids: one
        per level, see :meth:`level_locations`): ``standardized`` and ``tokens`` (teacher units), one ``[B, L_l, D_l]``
        per level, and, if enabled, ``rgb`` ``[B, L_f, C*ph*pw]`` for the finest level's locations."""
        per_level = self.level_locations(locations)
        if self.config.level_mode == "query":
            share, weights, maps = self.image_shares(images)
            features = [
                self.trunk_features(self.first_layer(share, weights, locations, level, maps))
                for level in range(len(self.config.level_dims))
            ]
            standardized = [self.heads[0](f) for f in features]
            rgb_features = features[-1]
        elif self.config.one_grid:
            rgb_features = self.forward_features(images, locations)
            standardized = self.forward_head(rgb_features)
        else:
            features = self.level_features(images, per_level)
            standardized = [head(f) for head, f in zip(self.heads, features, strict=True)]
            rgb_features = features[self.config.finest_level]
        tokens = [
            scale.restore(z.float(), where)
            for scale, z, where in zip(self.scales, standardized, per_level, strict=True)
        ]
        rgb = self.rgb_head(rgb_features) if self.rgb_head is not None else None
        return {"standardized": standardized, "tokens": tokens, "rgb": rgb}

    def level_features(self, images: torch.Tensor, per_level: list[torch.Tensor | None]) -> list[torch.Tensor]:
        """Trunk features ``[B, L_l, hidden[-1]]`` per level, each at its own grid's ``per_level`` locations, from one
        trunk pass over every level's queries."""
        share, weights, maps = self.image_shares(images)
        firsts = [self.first_layer(share, weights, where, level, maps) for level, where in enumerate(per_level)]
        features = self.trunk_features(torch.cat(firsts, dim=1))
        return list(features.split([f.shape[1] for f in firsts], dim=1))

    @torch.no_grad()
    def predict_tokens(self, images: torch.Tensor, chunk: int = 256) -> list[torch.Tensor]:
        """Every location's predicted teacher tokens per level ``[B, T_l, D_l]``, queried ``chunk`` locations at a time
        (memory does not grow with the grid); levels on their own grids are queried one level at a time."""
        if self.config.one_grid:
            return self._predict_level(images, chunk, self.config.num_tokens, lambda where: where)
        empty = torch.zeros(0, dtype=torch.long, device=images.device)
        return [
            self._predict_level(
                images,
                chunk,
                self.config.level_tokens(level),
                lambda where, level=level: [where if i == level else empty for i in range(len(self.config.level_dims))],
            )[level]
            for level in range(len(self.config.level_dims))
        ]

    def _predict_level(
        self, images: torch.Tensor, chunk: int, count: int, query: Callable[[torch.Tensor], Locations]
    ) -> list[torch.Tensor]:
        """Tokens per level for locations ``0..count`` in chunks, each chunk's locations passed through ``query``."""
        outs: list[list[torch.Tensor]] = [[] for _ in self.config.level_dims]
        for start in range(0, count, chunk):
            locations = torch.arange(start, min(start + chunk, count), device=images.device)
            for i, tokens in enumerate(self.forward(images, query(locations))["tokens"]):
                outs[i].append(tokens)
        return [torch.cat(parts, dim=1) for parts in outs]

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """Fresh random weights (seeded), keeping the target standardisation: a student trained from scratch."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Conv2d, nn.LayerNorm, CellMixer)):
                    module.reset_parameters()
            if isinstance(self.codes, nn.Parameter):
                self.codes.copy_(torch.cat(self.code_tables()))

    # -- bookkeeping -----------------------------------------------------------------------------------------
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_image(self) -> int:
        """Multiply-adds x 2 for one image with every location queried (the trigger's share of the first layer once)."""
        cfg = self.config
        widths = cfg.filter_widths
        cells = cfg.grid[0] * cfg.grid[1]
        macs = cells * cfg.in_chans * widths[0] * cfg.patch_size[0] * cfg.patch_size[1]
        macs += cells * sum(a * b for a, b in itertools.pairwise(widths))  # the cells' 1x1 layers
        macs += self.mixer.macs(cells) if self.mixer is not None else 0
        trigger_share = cfg.trigger_dim * cfg.hidden[0]  # once per image (APM.trigger_share), not per query
        macs += trigger_share
        trunk = sum(m.in_features * m.out_features for m in self.trunk.modules() if isinstance(m, nn.Linear))
        trunk -= trigger_share
        heads = sum(h.in_features * h.out_features for h in self.heads)
        rgb = self.rgb_head.in_features * self.rgb_head.out_features if self.rgb_head is not None else 0
        if cfg.one_grid:
            passes = len(cfg.level_dims) if cfg.level_mode == "query" else 1
            macs += cfg.num_tokens * (passes * (trunk + heads) + rgb)
        else:  # each level's locations pass the trunk and that level's head; the finest level's also the rgb head
            macs += sum(
                cfg.level_tokens(i) * (trunk + h.in_features * h.out_features) for i, h in enumerate(self.heads)
            )
            macs += cfg.level_tokens(cfg.finest_level) * rgb
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
