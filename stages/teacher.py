"""The frozen timm teacher: building it, its preprocessing, and its multi-level tokens.

A :class:`Teacher` wraps any timm model with ``forward_intermediates`` (ViTs first-class, ConvNets too). It
resolves 1-based ``--layers`` into timm indices, returns each cached level as tokens ``[B, T, D]`` (prefix
tokens such as CLS/registers first, then the patch grid row-major; ConvNet feature maps flattened), the
logits when the model has a head, and the data config (size, crop, interpolation, mean/std) that timm
derives from the model's pretrained config.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import threading
from collections.abc import Callable
from typing import Any

import timm
import torch
from PIL import Image
from timm.data import resolve_data_config
from torch import nn

from apmpipe.storage.errors import ConfigError, ModelError
from apmpipe.storage.format import LevelLayout

from .extract_config import LOCAL_DIR, TeacherConfig  # noqa: F401 (TeacherConfig is public here too)
from .head import TeacherHead, describe_head
from .inputs import PixelNormalizer
from .preprocess import pixel_transform
from .runtime import resolve_device

_logger = logging.getLogger(__name__)


def _weights_sha256(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


HUB_TIMEOUT_S = 3.0  # an answer from the hub within this long means downloads can go ahead
WEIGHTS_HINT = (
    "download them where there is network and pass --checkpoint FILE or --teacher local-dir:FOLDER, or use "
    "--no-pretrained"
)


def _cached_hub_file(repo: str, filename: str | None) -> str | None:
    """The weights file of hub ``repo`` (``org/name[@revision]``) already in the local Hugging Face cache, or None."""
    from huggingface_hub import try_to_load_from_cache

    repo_id, _, revision = repo.partition("@")
    for name in (
        (filename,) if filename else ("model.safetensors", "pytorch_model.bin")
    ):  # the files timm fetches, in its order
        path = try_to_load_from_cache(repo_id, name, revision=revision or None)
        if isinstance(path, str):
            return path
    return None


def _hub_problem(endpoint: str) -> str | None:
    """Why the hub at ``endpoint`` cannot be reached (one short HEAD request through the hub's own client,
    proxies included), or None when it answers."""
    from huggingface_hub.utils import get_session

    try:
        get_session().head(endpoint, timeout=HUB_TIMEOUT_S)
    except Exception as exc:  # DNS failure, refused connection, timeout, proxy error: all mean no download
        return str(exc).strip().splitlines()[0][:80] if str(exc).strip() else type(exc).__name__
    return None


def _pretrained_source(config: TeacherConfig) -> dict[str, Any]:
    """``create_model`` arguments for hub-hosted pretrained weights: the file in the local cache when it is
    there (no network at all); otherwise none, once the hub has answered, so that an offline machine fails in
    one line instead of after a minute of download retries. Weights from a checkpoint, a local folder or a
    plain URL need no check."""
    if not config.pretrained or config.checkpoint or config.name.startswith(LOCAL_DIR):
        return {}
    from huggingface_hub import constants

    if config.name.startswith("hf-hub:"):
        if constants.HF_HUB_OFFLINE:
            return {}  # the model's config and weights come from the local cache, or timm says they are missing
        repo = config.name[len("hf-hub:") :]
    else:
        cfg = timm.models.get_pretrained_cfg(config.name)
        repo = getattr(cfg, "hf_hub_id", None)
        if not repo:
            return {}
        cached = _cached_hub_file(repo, cfg.hf_hub_filename)
        if cached:
            return {"pretrained_cfg_overlay": {"file": cached}}
        if constants.HF_HUB_OFFLINE:
            raise ModelError(
                f"HF_HUB_OFFLINE is set and the pretrained weights of {config.name!r} are not in the "
                f"local Hugging Face cache; {WEIGHTS_HINT}"
            )
    problem = _hub_problem(constants.ENDPOINT)
    if problem:
        cached = " (already in the local cache? set HF_HUB_OFFLINE=1)" if config.name.startswith("hf-hub:") else ""
        raise ModelError(
            f"cannot reach the Hugging Face hub at {constants.ENDPOINT} for the weights of "
            f"{config.name!r} ({problem}); {WEIGHTS_HINT}{cached}"
        )
    return {}


def _create(config: TeacherConfig) -> nn.Module:
    config.check_files()
    kwargs = dict(config.model_kwargs)
    pretrained = config.pretrained and not config.checkpoint
    if ":" not in config.name and not timm.is_model(config.name):
        close = timm.list_models(f"*{config.name.split('.')[0][:12]}*")[:3]
        raise ModelError(
            f"unknown timm model {config.name!r}; see "
            f"timm.list_models(){' (close: ' + ', '.join(close) + ')' if close else ''}"
        )
    source = _pretrained_source(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        try:
            model = timm.create_model(config.name, pretrained=pretrained, **kwargs, **source)
        except TypeError as exc:
            raise ModelError(f"teacher {config.name!r} rejected --model-arg values {kwargs}: {exc}") from None
        except Exception as exc:
            if not pretrained:
                raise
            hint = (
                "check that the folder holds timm's config.json and its weights file"
                if config.name.startswith(LOCAL_DIR)
                else WEIGHTS_HINT
            )
            raise ModelError(
                f"could not obtain pretrained weights for {config.name!r} ({type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0][:120].strip()}); {hint}"
            ) from None
    if config.checkpoint:
        try:
            timm.models.load_checkpoint(model, config.checkpoint, weights_only=True)
        except Exception as exc:
            raise ModelError(
                f"--checkpoint {config.checkpoint!r} does not fit {config.name!r}: {str(exc).splitlines()[0][:160]}"
            ) from None
    return model.eval().requires_grad_(False)


def _data_config(model: nn.Module, in_chans: int) -> dict[str, Any]:
    """timm's eval data config, corrected for input-size and channel overrides passed as model kwargs."""
    cfg = dict(resolve_data_config({}, model=model))
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    size = tuple(img_size) if img_size else tuple(cfg["input_size"][1:])
    cfg["input_size"] = (in_chans, *size)
    for key in ("mean", "std"):
        values = tuple(float(v) for v in cfg[key])
        if len(values) != in_chans:
            values = (sum(values) / len(values),) * in_chans
        cfg[key] = values
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}


def _in_chans(model: nn.Module) -> int:
    first = model.pretrained_cfg.get("first_conv")
    if isinstance(first, (list, tuple)):
        first = first[0]
    module = model.get_submodule(first) if first else None
    chans = getattr(module, "in_channels", None) or getattr(model, "in_chans", None)
    if chans not in (1, 3):
        raise ModelError(
            f"teacher expects {chans} input channels; apmpipe feeds 1 (grayscale) or 3 (RGB) channel images"
        )
    return int(chans)


def resolve_layers(layers: tuple[int, ...], depth: int, name: str) -> tuple[int, ...]:
    """1-based block numbers (negative counts from the end, -1 is the last) -> sorted unique 1-based numbers."""
    resolved = []
    for layer in layers:
        number = depth + 1 + layer if layer < 0 else layer
        if layer == 0 or not 1 <= number <= depth:
            raise ConfigError(
                f"--layers {layer}: teacher {name!r} has {depth} levels; pick from 1..{depth} (1-based) or -1..-{depth}"
            )
        resolved.append(number)
    return tuple(sorted(set(resolved)))


class Teacher:
    """A frozen timm model returning tokens for the cached levels (and logits when it has a head).

    Args:
        config: how to build the model.
        layers: 1-based level numbers (``-1`` = last); resolved against the model's depth.
        final_norm: apply the model's final norm to every cached level (timm's ``norm=True``).
        device: torch device.
        amp: autocast (bfloat16) on CUDA.
    """

    def __init__(
        self,
        config: TeacherConfig,
        layers: tuple[int, ...],
        final_norm: bool = False,
        device: str = "auto",
        amp: bool = True,
    ) -> None:
        self.config = config
        self.model = _create(config)
        if not hasattr(self.model, "forward_intermediates"):
            raise ModelError(
                f"teacher {config.name!r} has no forward_intermediates in this timm; pick a ViT or "
                "another model that has it"
            )
        self.depth = len(self.model.feature_info)
        self.layers = resolve_layers(layers, self.depth, config.name)
        self.final_norm = final_norm
        self.in_chans = _in_chans(self.model)
        self.data_config = _data_config(self.model, self.in_chans)
        self.num_classes = int(getattr(self.model, "num_classes", 0) or 0)
        self.weights_sha256 = _weights_sha256(self.model)
        self.device = resolve_device(device)
        self.amp = amp and self.device.type == "cuda"
        self.model.to(self.device)
        self._normalizer = PixelNormalizer(self.data_config).to(self.device)
        params = inspect.signature(self.model.forward_intermediates).parameters
        self._prefix_kw = {"return_prefix_tokens": True} if "return_prefix_tokens" in params else {}
        self._memory_format = torch.contiguous_format
        self.levels = self._probe_levels()

    def use_fast_kernels(self) -> int:
        """Fused attention (timm's ``fused_attn``: scaled_dot_product_attention) in every attention block, and on CUDA
        ``channels_last`` weights and inputs (cuDNN's fast convolution layout: the patch embedding, a ConvNet's every
        layer). Returns the number of attention blocks now fused (0 for a model without them)."""
        blocks = [module for module in self.model.modules() if hasattr(module, "fused_attn")]
        for module in blocks:
            module.fused_attn = True
        if self.device.type == "cuda":
            self.model.to(memory_format=torch.channels_last)
            self._memory_format = torch.channels_last
        return len(blocks)

    @property
    def precision(self) -> str:
        """How this teacher computes tokens (recorded per shard; readers refuse a mix)."""
        return AUTOCAST if self.amp else "float32"

    @property
    def pixel_shape(self) -> tuple[int, int, int]:
        c, h, w = self.data_config["input_size"]
        return int(c), int(h), int(w)

    def identity(self) -> dict[str, Any]:
        """What makes two teachers the same for a cache: architecture, arguments, weights."""
        cfg = self.model.pretrained_cfg
        return {
            "name": self.config.name,
            "architecture": cfg.get("architecture", type(self.model).__name__),
            "model_kwargs": dict(self.config.model_kwargs),
            "pretrained_tag": cfg.get("tag") or cfg.get("hf_hub_id") or "",
            "weights": "pretrained"
            if self.config.pretrained and not self.config.checkpoint
            else ("checkpoint" if self.config.checkpoint else f"random-init(seed={self.config.seed})"),
            "weights_sha256": self.weights_sha256,
        }

    def pixel_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        return pixel_transform(self.data_config)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, C, H, W]`` -> normalised float on the teacher's device (the student's normaliser)."""
        return self._normalizer(pixels)

    @staticmethod
    def _as_tokens(feature: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        if isinstance(feature, tuple):  # (spatial [B, D, H, W], prefix [B, P, D])
            spatial, prefix = feature
            return torch.cat([prefix, spatial.flatten(2).transpose(1, 2)], dim=1)
        return feature.flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, H*W, C]

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor, amp: bool | None = None) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Tokens per cached level (float32 ``[B, T, D]``) and logits (float32 ``[B, K]`` or None).

        ``amp`` overrides the teacher's autocast setting for this call.
        """
        x = self.normalize(pixels).contiguous(memory_format=self._memory_format)
        indices = [layer - 1 for layer in self.layers]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp if amp is None else amp):
            out = self.model.forward_intermediates(
                x,
                indices=indices,
                norm=self.final_norm,
                output_fmt="NCHW",
                intermediates_only=not self.num_classes,
                **self._prefix_kw,
            )
            if self.num_classes:
                final, features = out
                logits = self.model.forward_head(final).float()
            else:
                features, logits = out, None
        return [self._as_tokens(f).float() for f in features], logits

    def _probe_levels(self) -> tuple[LevelLayout, ...]:
        with torch.inference_mode():
            features = self.model.forward_intermediates(
                self.normalize(torch.zeros((1, *self.pixel_shape), dtype=torch.uint8)),
                indices=[layer - 1 for layer in self.layers],
                output_fmt="NCHW",
                intermediates_only=True,
                **self._prefix_kw,
            )
        levels = []
        for layer, feature in zip(self.layers, features, strict=True):
            spatial, prefix = feature if isinstance(feature, tuple) else (feature, None)
            levels.append(
                LevelLayout(
                    layer=layer,
                    prefix_tokens=0 if prefix is None else int(prefix.shape[1]),
                    grid=(int(spatial.shape[2]), int(spatial.shape[3])),
                    dim=int(spatial.shape[1]),
                )
            )
        return tuple(levels)

    def head(self) -> tuple[TeacherHead | None, str]:
        """The classifier rebuilt from the final level's tokens, checked against the teacher's own logits.

        Returns ``(head, "")`` or ``(None, reason)``; never raises, so extraction (and its logits) goes on.
        """
        if not self.num_classes:
            return None, "teacher has no classification head"
        if self.layers[-1] != self.depth:
            return None, f"the final level ({self.depth}) is not cached; add -1 to --layers"
        try:
            return self._checked_head(), ""
        except ValueError as exc:
            return None, str(exc)
        except Exception as exc:  # an unforeseen head must not abort extraction: store the reason instead
            return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"

    def _checked_head(self) -> TeacherHead:
        generator = torch.Generator().manual_seed(0)
        pixels = torch.randint(0, 256, (2, *self.pixel_shape), dtype=torch.uint8, generator=generator)

        @torch.inference_mode()
        def run() -> torch.Tensor:  # the path extraction takes, float32, intermediates un-normed
            final, _ = self.model.forward_intermediates(
                self.normalize(pixels), indices=[self.depth - 1], norm=False, output_fmt="NCHW", **self._prefix_kw
            )
            return self.model.forward_head(final)

        level = self.levels[-1]
        head = describe_head(
            self.model, run, self.model.feature_info[-1]["module"], level.prefix_tokens, level.grid, self.final_norm
        )
        tokens, logits = self.forward(pixels, amp=False)  # compare in float32: autocast noise is not a head mismatch
        with torch.inference_mode():
            rebuilt = head.to(self.device)(tokens[-1])
        scale = float(logits.abs().max()) + 1e-6
        if rebuilt.shape != logits.shape or not torch.allclose(rebuilt, logits, atol=2e-3 * scale, rtol=1e-3):
            raise ValueError("rebuilding the head from cached tokens did not reproduce the teacher's logits")
        return head.cpu()


# Random init seeds torch's global RNG, which is process-wide: two threads building at once (pools of a driver
# and an in-process dask worker included) would get other weights. The lock guards that process state.
_BUILD_LOCK = threading.Lock()


AUTOCAST = "bfloat16-autocast"  # the precision of a CUDA teacher under --amp; else "float32"


class TeacherPool:
    """Teachers built once per configuration and kept by whoever holds the pool (an extraction run, a dask
    worker), so shards and tasks reuse one teacher; safe to share between threads."""

    def __init__(self, size: int = 2) -> None:
        self._size = size
        self._teachers: dict[tuple[Any, ...], Teacher] = {}

    def get(self, config: TeacherConfig, layers: tuple[int, ...], final_norm: bool, device: str, amp: bool) -> Teacher:
        """The teacher for these options, built on first use (the oldest is dropped beyond ``size``)."""
        key = (repr(config), tuple(layers), final_norm, device, amp)  # repr: model args may hold dicts
        with _BUILD_LOCK:
            if key not in self._teachers:
                if len(self._teachers) >= self._size:
                    self._teachers.pop(next(iter(self._teachers)))
                self._teachers[key] = Teacher(config, layers, final_norm=final_norm, device=device, amp=amp)
            return self._teachers[key]
