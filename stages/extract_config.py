"""Options of stage one (:class:`TeacherConfig`, :class:`ExtractConfig`) and :func:`preflight`, their checks
against the inputs and files they name.

This module imports neither torch nor timm: the CLI builds and checks a run's options here first, so a typo in
an option, a missing input or teacher folder comes back as one line in well under a second, before the
teacher's libraries load (seconds) and the teacher is built.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from apmpipe.storage.errors import (
    AT_LEAST_ONE,
    NON_NEGATIVE,
    WORKERS,
    ConfigError,
    ModelError,
    Range,
    check_choice,
    check_ranges,
)
from apmpipe.storage.files import check_writable
from apmpipe.storage.format import CODECS, check_crop_scale, parse_augments
from apmpipe.storage.pixel_codecs import PIXEL_CODECS
from apmpipe.storage.redact import redact_url
from apmpipe.storage.sources import DEFAULT_MAX_PIXELS, ResolvedInputs
from apmpipe.storage.token_codecs import TOKEN_DTYPES

from .input_options import label_options, resolve_config_inputs

LOCAL_DIR = "local-dir:"
# measured: docs/train.md, "Few images: more of the teacher's own views". Under 16,000 samples (images x views) and
# 32 views the CLS gap was 0.08-0.50 (4,000 x 1 view: 0.10-0.12; 1,024 x 8: 0.08), from there on 0.03-0.063 (4,000 x 4:
# 0.03; 1,024 x 16: 0.05-0.063); 32,768 samples kept it inside 0.05 on 1,024-4,000 images (1,024 x 32: 0.036-0.047),
# so --views auto stores that many
ENOUGH_VIEWS, ENOUGH_RENDERS, AUTO_RENDERS = 32, 16_000, 32_768
AUTO_VIEW_AUGMENT, AUTO_VIEW_CROP_SCALE = ("crop",), (0.35, 1.0)  # the views every row of that table was measured on
MORE_VIEWS = "--views auto"  # the extract option both warnings advise (extract's default)


def auto_views(images: int) -> int:
    """The views per image ``extract --views auto`` stores for ``images`` images: enough for AUTO_RENDERS samples
    (images x views), at most ENOUGH_VIEWS; 1 from AUTO_RENDERS images on."""
    return min(ENOUGH_VIEWS, max(1, -(-AUTO_RENDERS // max(1, images))))


def few_images_note(images: int, views: float) -> str:
    """What a student trained on ``images`` distinct images with ``views`` views each will do, in one clause, when
    they have fewer than ENOUGH_VIEWS views each and make fewer than ENOUGH_RENDERS samples; empty otherwise.
    ``train`` and ``extract`` each add the fix that fits where they are."""
    if views >= ENOUGH_VIEWS or images * views >= ENOUGH_RENDERS:
        return ""
    return (
        f"{images:,} distinct images x {views:.3g} view(s): so few, a student learns them by heart (measured on "
        "1,024 images: held-out CLS R2 0.31-0.33 under training's with 1 view, 0.14-0.16 with 4, 0.04 with 32)"
    )


@dataclass(frozen=True)
class TeacherConfig:
    """How to build the teacher.

    Args:
        name: any name ``timm.create_model`` accepts, incl. ``hf-hub:org/repo`` and ``local-dir:/path``.
        pretrained: load the model's pretrained weights (hub download, or the ``local-dir`` folder's weights).
        checkpoint: a bare state dict (``.safetensors``, or ``.pth``/``.bin`` loaded with ``weights_only``).
        model_kwargs: extra ``create_model`` keyword arguments, e.g. ``(("img_size", 32), ("depth", 2))``.
        seed: seeds random initialisation, so a random-init teacher is the same in every process.
    """

    name: str
    pretrained: bool = True
    checkpoint: str | None = None
    model_kwargs: tuple[tuple[str, Any], ...] = ()
    seed: int = 0

    RANGES: ClassVar[dict[str, Range]] = {"seed": NON_NEGATIVE}

    def __post_init__(self) -> None:
        check_ranges(vars(self), self.RANGES)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pretrained": self.pretrained,
            "checkpoint": self.checkpoint,
            "model_kwargs": dict(self.model_kwargs),
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TeacherConfig:
        return cls(
            name=data["name"],
            pretrained=data["pretrained"],
            checkpoint=data.get("checkpoint"),
            model_kwargs=tuple(sorted(data.get("model_kwargs", {}).items())),
            seed=data.get("seed", 0),
        )

    def check_files(self) -> None:
        """Refuse (ModelError) a ``--checkpoint`` file or ``local-dir:`` folder that is not there."""
        if self.checkpoint and not os.path.isfile(self.checkpoint):
            raise ModelError(f"--checkpoint {self.checkpoint!r} does not exist")
        if self.name.startswith(LOCAL_DIR):
            folder = self.name[len(LOCAL_DIR) :]
            if not os.path.isfile(os.path.join(folder, "config.json")):
                what = "has no config.json" if os.path.isdir(folder) else "is not a folder"
                raise ModelError(
                    f"--teacher {self.name}: {folder!r} {what}; a local-dir teacher is a folder with "
                    "timm's config.json and model.safetensors"
                )


@dataclass(frozen=True)
class ExtractConfig:
    """Options of one ``apmpipe extract`` run (saved in the cache's root attributes)."""

    inputs: tuple[str, ...]
    out: str
    teacher: TeacherConfig
    layers: tuple[int, ...] = (-1,)
    final_norm: bool = False
    dtype: str = "float16"
    codec: str | None = None  # None: the codec of the cache at ``out`` when it exists, else DEFAULT_CODEC
    rank: int = 0
    pixel_codec: str = "raw"
    views: int | None = None  # None: auto, auto_views() of the images counted (resolved by :meth:`with_views`)
    view_augment: tuple[str, ...] = ()  # with views > 1 or auto: () stands for AUTO_VIEW_AUGMENT
    view_crop_scale: tuple[float, float] = AUTO_VIEW_CROP_SCALE
    batch_size: int = 32
    loader_workers: int = -1
    chunk_samples: int = 16
    shard_samples: int = 256
    label_key: str | None = "cls"
    class_names: tuple[str, ...] = ()
    max_pixels: int = DEFAULT_MAX_PIXELS
    folder_block: int = 1000
    device: str = "auto"
    amp: bool = True
    precision: str | None = None  # set by a driver for its workers: every task computes so (None: --device/--amp)
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)  # may hold credentials; dask logs reprs

    RANGES: ClassVar[dict[str, Range]] = {
        "rank": NON_NEGATIVE,
        "views": AT_LEAST_ONE,
        "batch_size": AT_LEAST_ONE,
        "loader_workers": WORKERS,
        "chunk_samples": AT_LEAST_ONE,
        "shard_samples": AT_LEAST_ONE,
        "max_pixels": AT_LEAST_ONE,
        "folder_block": AT_LEAST_ONE,
    }

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ConfigError(
                "no SOURCE given; pass WebDataset shards (.tar/.tgz, brace patterns, a directory) or an image folder"
            )
        check_ranges(vars(self), self.RANGES)
        check_choice("--dtype", self.dtype, TOKEN_DTYPES)
        if self.codec is not None:
            check_choice("--codec", self.codec, CODECS)
        check_choice("--pixel-codec", self.pixel_codec, PIXEL_CODECS)
        if not self.layers:
            raise ConfigError("--layers is empty; pass e.g. --layers 4,8,12 or --layers -1")
        object.__setattr__(self, "view_augment", parse_augments(self.view_augment, "--view-augment"))
        if self.views is not None and self.views > 1 and not self.view_augment:
            object.__setattr__(self, "view_augment", AUTO_VIEW_AUGMENT)
        check_crop_scale(self.view_crop_scale, "--view-crop-scale")
        if self.views == 1 and self.view_augment:
            raise ConfigError(
                "--view-augment draws views 1..N-1, and --views 1 stores the image alone; pass --views N (N > 1) or "
                "--views auto"
            )
        if self.shard_samples % self.chunk_samples:
            raise ConfigError(
                f"--shard-samples ({self.shard_samples}) must be a positive multiple of --chunk-samples "
                f"({self.chunk_samples})"
            )

    @classmethod
    def from_options(
        cls,
        inputs: Sequence[str] | str,
        out: str,
        teacher: str,
        *,
        pretrained: bool = True,
        checkpoint: str | os.PathLike | None = None,
        model_kwargs: dict[str, Any] | None = None,
        seed: int = 0,
        layers: Sequence[int] = (-1,),
        no_labels: bool = False,
        class_names_file: str | None = None,
        max_pixels: int | None = None,
        **options: Any,
    ) -> ExtractConfig:
        """Build from flat options, as the command line and :func:`apmpipe.extract` give them: the teacher's
        (``pretrained``, ``checkpoint``, ``model_kwargs``, ``seed``) beside every other field; ``no_labels``
        stores no labels; ``class_names_file`` is read into ``class_names`` (one name per line)."""
        options.update(label_options(no_labels, class_names_file, options.get("storage_options") or {}))
        teacher_config = TeacherConfig(
            name=teacher,
            pretrained=pretrained,
            checkpoint=os.path.abspath(checkpoint) if checkpoint else None,
            model_kwargs=tuple(sorted((model_kwargs or {}).items())),
            seed=seed,
        )
        return cls(
            inputs=(inputs,) if isinstance(inputs, str) else tuple(inputs),
            out=out,
            teacher=teacher_config,
            layers=tuple(layers),
            max_pixels=DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels,
            **options,
        )

    def with_views(self, views: int) -> ExtractConfig:
        """This config with ``views`` per image decided (``--views auto`` resolved): with more than one, its
        --view-augment (AUTO_VIEW_AUGMENT if none was given); with one, none."""
        return replace(self, views=views, view_augment=self.view_augment if views > 1 else ())

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": [redact_url(i) for i in self.inputs],
            "teacher": self.teacher.to_dict(),
            "layers": list(self.layers),
            "final_norm": self.final_norm,
            "dtype": self.dtype,
            "codec": self.codec,
            "rank": self.rank,
            "pixel_codec": self.pixel_codec,
            "views": self.views,
            "view_augment": list(self.view_augment),
            "view_crop_scale": list(self.view_crop_scale),
            "batch_size": self.batch_size,
            "label_key": self.label_key,
            "class_names": list(self.class_names),
            "max_pixels": self.max_pixels,
            "folder_block": self.folder_block,
            "amp": self.amp,
        }


def preflight(config: ExtractConfig) -> ResolvedInputs:
    """Check what ``config`` names before any teacher is built: the inputs (resolved into shard units, which
    are returned), the teacher's files, options that contradict the inputs, and that ``--out`` can be written."""
    check_writable(config.out)
    inputs = resolve_config_inputs(config)
    config.teacher.check_files()
    return inputs
