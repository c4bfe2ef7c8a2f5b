"""The teacher's classifier, rebuilt from cached tensors so stage two classifies without the teacher.

:func:`describe_head` records what a timm model computes between its last feature level and its logits: the
modules it calls there (found by running the model once with forward hooks, so no model family is special-cased)
and the functional steps between them (token pooling, flattening), as a list of plain ops with their tensors.
:class:`TeacherHead` replays the ops on the final level's tokens. Ops:

- ``conv2d`` (stride, padding, dilation, groups), ``batchnorm`` (eval statistics), ``layernorm`` (over the
  channel axis of a map or the last axis of tokens), ``act`` (relu, silu, gelu, hardswish, ...), ``linear``;
- ``pool`` (a map's avg / max / avgmax, optionally flattened), ``pool_tokens`` (token = first token, or
  avg / max / avgmax over the grid tokens, prefix tokens apart), ``flatten``.

That covers ViT-family heads (CLS or average pooling, registers, ``fc_norm``, a CLIP projection) and ConvNet
heads with a conv / BN / activation stage before or after pooling (EfficientNet ``conv_head`` + ``bn2``,
MobileNetV3 ``conv_head``, ConvNeXt's head norm, ResNet). Anything else (attention pooling, a custom module)
is reported as unsupported; the teacher also checks the rebuilt head against its own logits before storing it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from apmpipe.storage.errors import CacheError

POOLS = ("token", "avg", "max", "avgmax")
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "relu6": F.relu6,
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    "hardswish": F.hardswish,
    "hardsigmoid": F.hardsigmoid,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}
_ACTIVATION_CLASSES = {
    "ReLU": "relu",
    "ReLU6": "relu6",
    "SiLU": "silu",
    "Swish": "silu",
    "GELU": "gelu",
    "GELUTanh": "gelu_tanh",
    "Hardswish": "hardswish",
    "HardSwish": "hardswish",
    "Hardsigmoid": "hardsigmoid",
    "HardSigmoid": "hardsigmoid",
    "Tanh": "tanh",
    "Sigmoid": "sigmoid",
    "QuickGELU": "quick_gelu",
}
_PASS_THROUGH = (nn.Identity, nn.Dropout)
_TENSORS = {  # op -> (required, optional) tensor names
    "conv2d": (("weight",), ("bias",)),
    "batchnorm": (("running_mean", "running_var"), ("weight", "bias")),
    "layernorm": ((), ("weight", "bias")),
    "linear": (("weight",), ("bias",)),
    "act": ((), ()),
    "pool": ((), ()),
    "pool_tokens": ((), ()),
    "flatten": ((), ()),
}

Op = tuple[dict[str, Any], dict[str, torch.Tensor]]


def _params(module: nn.Module, *names: str) -> dict[str, torch.Tensor]:
    return {name: getattr(module, name) for name in names if getattr(module, name, None) is not None}


def _activation(module: nn.Module) -> list[Op] | None:
    name = _ACTIVATION_CLASSES.get(type(module).__name__)
    if name == "gelu" and getattr(module, "approximate", "none") == "tanh":
        name = "gelu_tanh"
    return [({"type": "act", "fn": name}, {})] if name else None


def _norm_ops(module: nn.Module) -> list[Op] | None:
    if isinstance(module, nn.BatchNorm2d):  # timm's BatchNormAct2d adds its activation
        ops: list[Op] = [
            (
                {"type": "batchnorm", "eps": float(module.eps)},
                _params(module, "running_mean", "running_var", "weight", "bias"),
            )
        ]
        act = getattr(module, "act", None)
        return ops if act is None else (None if (tail := _module_ops(act)) is None else ops + tail)
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        channels_first = type(module).__name__ == "LayerNorm2d"
        return [
            (
                {"type": "layernorm", "eps": float(module.eps), "channels_first": channels_first},
                _params(module, "weight", "bias"),
            )
        ]
    return None


def _pool_ops(module: nn.Module) -> list[Op] | None:
    pool_type = getattr(module, "pool_type", None)
    if type(module).__name__ == "SelectAdaptivePool2d" and pool_type in ("avg", "max", "avgmax"):
        return [({"type": "pool", "pool": pool_type, "flatten": isinstance(module.flatten, nn.Flatten)}, {})]
    if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) and module.output_size in (1, (1, 1)):
        return [
            (
                {
                    "type": "pool",
                    "pool": "avg" if isinstance(module, nn.AdaptiveAvgPool2d) else "max",
                    "flatten": False,
                },
                {},
            )
        ]
    if isinstance(module, nn.Flatten) and module.start_dim == 1:
        return [({"type": "flatten"}, {})]
    return None


def _module_ops(module: nn.Module) -> list[Op] | None:
    """The ops one module computes, or None when it is not one this file can replay."""
    if isinstance(module, _PASS_THROUGH):
        return []
    if isinstance(module, nn.Linear):  # timm's Linear subclass computes the same (the logits check confirms)
        return [({"type": "linear"}, _params(module, "weight", "bias"))]
    if (
        isinstance(module, nn.Conv2d)
        and type(module).__name__ != "Conv2dSame"
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    ):
        attrs = {
            "type": "conv2d",
            "stride": list(module.stride),
            "padding": list(module.padding),
            "dilation": list(module.dilation),
            "groups": module.groups,
        }
        return [(attrs, _params(module, "weight", "bias"))]
    for convert in (_activation, _norm_ops, _pool_ops):
        ops = convert(module)
        if ops is not None:
            return ops
    return None


def _units(model: nn.Module) -> dict[str, tuple[nn.Module, list[Op] | None]]:
    """The modules a head is made of: those with known ops (not descended into) and unknown leaves (ops None)."""
    units: dict[str, tuple[nn.Module, list[Op] | None]] = {}

    def visit(prefix: str, module: nn.Module) -> None:
        ops = _module_ops(module)
        children = list(module.named_children())
        if ops is not None or not children:
            units[prefix] = (module, ops)
            return
        for name, child in children:
            visit(f"{prefix}.{name}" if prefix else name, child)

    visit("", model)
    return units


def _trace_tail(
    model: nn.Module, boundary: str, run: Callable[[], torch.Tensor]
) -> tuple[tuple[int, ...], list[tuple[str, nn.Module, list[Op] | None, tuple, tuple]], torch.Tensor]:
    """Run the model; return the boundary module's output shape, the units called after it (name, module,
    ops, input shape, output shape) in call order, and the logits."""
    calls: list[tuple[str, nn.Module, list[Op] | None, tuple, tuple]] = []
    state: dict[str, tuple[int, ...]] = {}

    def after_boundary(module: nn.Module, args: tuple, output: Any) -> None:
        state["shape"] = tuple((output[0] if isinstance(output, (tuple, list)) else output).shape)

    def make_hook(name: str, ops: list[Op] | None) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if "shape" in state and args and isinstance(output, torch.Tensor):
                calls.append((name, module, ops, tuple(args[0].shape), tuple(output.shape)))

        return hook

    handles = [model.get_submodule(boundary).register_forward_hook(after_boundary)]
    handles += [
        module.register_forward_hook(make_hook(name, ops)) for name, (module, ops) in _units(model).items() if name
    ]
    try:
        logits = run()
    finally:
        for handle in handles:
            handle.remove()
    if "shape" not in state:
        raise ValueError(f"the last feature level ({boundary}) was not computed")
    return state["shape"], calls, logits


def _bridge(model: nn.Module, before: tuple, after: tuple, prefix_tokens: int, where: str) -> list[Op]:
    """Functional steps between two recorded shapes: none, token pooling or flattening."""
    if before == after:
        return []
    pool = getattr(model, "global_pool", None)
    if len(before) == 3 and len(after) == 2 and before[2] == after[1]:
        if pool not in POOLS or getattr(model, "attn_pool", None) is not None:
            raise ValueError(f"unsupported token pooling {pool!r} (only {', '.join(POOLS)})")
        return [({"type": "pool_tokens", "pool": pool, "prefix_tokens": prefix_tokens}, {})]
    if len(before) == 4 and len(after) == 2 and before[2:] == (1, 1) and before[1] == after[1]:
        return [({"type": "flatten"}, {})]
    raise ValueError(f"unsupported step {list(before)} -> {list(after)} {where}")


def describe_head(
    model: nn.Module,
    run: Callable[[], torch.Tensor],
    boundary: str,
    prefix_tokens: int,
    grid: tuple[int, int],
    tokens_normed: bool,
) -> TeacherHead:
    """Record the model's head as a :class:`TeacherHead` (raises ValueError when a step is unsupported).

    Args:
        run: computes the logits through the same path as extraction (forward_intermediates + forward_head).
        boundary: the module whose output is the last cached level (timm's ``feature_info[-1]["module"]``).
        prefix_tokens, grid: the cached layout of that level.
        tokens_normed: the cached tokens already went through the model's final ``norm``.
    """
    if getattr(model, "attn_pool", None) is not None:
        raise ValueError("attention pooling (attn_pool, global_pool='map') is not supported")
    shape, calls, logits = _trace_tail(model, boundary, run)
    if tokens_normed:
        if not calls or calls[0][1] is not getattr(model, "norm", None):
            raise ValueError("--final-norm: the head does not start with the model's final norm")
        calls = calls[1:]
    ops: list[Op] = []
    layout = "map" if len(shape) == 4 else "tokens"
    for name, module, unit_ops, before, after in calls:
        if unit_ops is None:
            raise ValueError(f"unsupported head module {name} ({type(module).__name__})")
        ops += _bridge(model, shape, before, prefix_tokens, f"before {name}") + unit_ops
        shape = after
    ops += _bridge(model, shape, tuple(logits.shape), prefix_tokens, "before the logits")
    attrs = {"input": layout, "prefix_tokens": prefix_tokens, "grid": list(grid), "ops": [op for op, _ in ops]}
    tensors = {
        f"{index}.{name}": value.detach().cpu().float().numpy()
        for index, (_, params) in enumerate(ops)
        for name, value in params.items()
    }
    return TeacherHead(tensors, attrs)


def _problem(attrs: dict[str, Any], tensors: dict[str, Any]) -> str | None:
    """What is wrong with stored head attributes and tensors, or None."""
    if attrs.get("input") not in ("tokens", "map") or not isinstance(attrs.get("ops"), list):
        return f"input {attrs.get('input')!r} / ops missing"
    for index, op in enumerate(attrs["ops"]):
        kind = op.get("type") if isinstance(op, dict) else None
        if kind not in _TENSORS:
            return f"op {index} has unknown type {kind!r}"
        if kind in ("pool", "pool_tokens") and op.get("pool") not in POOLS:
            return f"op {index} has unknown pool {op.get('pool')!r} (known: {', '.join(POOLS)})"
        if kind == "act" and op.get("fn") not in ACTIVATIONS:
            return f"op {index} has unknown activation {op.get('fn')!r}"
        missing = [name for name in _TENSORS[kind][0] if f"{index}.{name}" not in tensors]
        if missing:
            return f"op {index} ({kind}) lacks tensor {missing[0]!r}"
    return None


class TeacherHead(nn.Module):
    """Final-level tokens ``[B, T, D]`` -> logits ``[B, K]``, exactly as the teacher computes them."""

    def __init__(self, tensors: dict[str, np.ndarray], attrs: dict[str, Any]) -> None:
        super().__init__()
        problem = _problem(attrs, tensors)
        if problem:
            raise CacheError(f"the cached teacher head is malformed: {problem}; re-extract the cache with this apmpipe")
        self.attrs = dict(attrs)
        self.ops: list[dict[str, Any]] = list(attrs["ops"])
        self.prefix_tokens = int(attrs.get("prefix_tokens", 0))
        self.grid = tuple(int(v) for v in attrs.get("grid", (0, 0)))
        self._names = {name: "t" + name.replace(".", "_") for name in tensors}
        for name, value in tensors.items():
            self.register_buffer(self._names[name], torch.as_tensor(np.asarray(value), dtype=torch.float32))

    @property
    def pool(self) -> str:
        """The pooling rule, for summaries."""
        return next((op["pool"] for op in self.ops if op["type"] in ("pool", "pool_tokens")), "none")

    def tensors(self) -> dict[str, np.ndarray]:
        """The head's tensors under their cache names (inverse of the constructor)."""
        return {name: getattr(self, buffer).cpu().numpy() for name, buffer in self._names.items()}

    def _tensor(self, index: int, name: str) -> torch.Tensor | None:
        return getattr(self, self._names.get(f"{index}.{name}", ""), None)

    def _run_op(self, index: int, op: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
        kind, get = op["type"], functools.partial(self._tensor, index)
        if kind == "linear":
            return F.linear(x, get("weight"), get("bias"))
        if kind == "conv2d":
            return F.conv2d(x, get("weight"), get("bias"), op["stride"], op["padding"], op["dilation"], op["groups"])
        if kind == "batchnorm":
            return F.batch_norm(
                x, get("running_mean"), get("running_var"), get("weight"), get("bias"), False, 0.0, op["eps"]
            )
        if kind == "layernorm":
            if op["channels_first"]:
                return F.layer_norm(x.movedim(1, -1), (x.shape[1],), get("weight"), get("bias"), op["eps"]).movedim(
                    -1, 1
                )
            return F.layer_norm(x, (x.shape[-1],), get("weight"), get("bias"), op["eps"])
        if kind == "act":
            return ACTIVATIONS[op["fn"]](x)
        if kind == "flatten":
            return x.flatten(1)
        if kind == "pool":
            pooled = {
                "avg": lambda: x.mean((2, 3), keepdim=True),
                "max": lambda: x.amax((2, 3), keepdim=True),
                "avgmax": lambda: 0.5 * (x.mean((2, 3), keepdim=True) + x.amax((2, 3), keepdim=True)),
            }[op["pool"]]()
            return pooled.flatten(1) if op["flatten"] else pooled
        return self._pool_tokens(x, op["pool"], int(op["prefix_tokens"]))

    @staticmethod
    def _pool_tokens(x: torch.Tensor, pool: str, prefix_tokens: int) -> torch.Tensor:
        """``[B, T, D]`` -> ``[B, D]``: the first token, or avg / max / avgmax over the grid tokens."""
        if pool == "token":
            return x[:, 0]
        patches = x[:, prefix_tokens:]
        if pool == "avg":
            return patches.mean(1)
        if pool == "max":
            return patches.amax(1)
        return 0.5 * (patches.mean(1) + patches.amax(1))

    @property
    def needs_full_grid(self) -> bool:
        """True when the head reads the whole feature map (ConvNets), False when any subset of tokens will do."""
        return self.attrs["input"] == "map"

    def forward(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Logits ``[B, K]``; ``pre_logits``: the feature the final linear layer reads (timm's ``pre_logits``)."""
        x = tokens.float()
        if self.needs_full_grid:  # ConvNet level: [B, h*w, C] tokens back to the [B, C, h, w] map
            x = x[:, self.prefix_tokens :].transpose(1, 2).reshape(len(x), -1, *self.grid)
        ops = self.ops[:-1] if pre_logits and self.ops[-1]["type"] == "linear" else self.ops
        for index, op in enumerate(ops):
            x = self._run_op(index, op, x)
        return x.flatten(1) if pre_logits else x
