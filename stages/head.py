"""The teacher's classifier, rebuilt from cached tensors so stage two classifies without the teacher.

:func:`describe_head` reads a timm model's final norm, pooling rule, pre-logits norm and linear head into
plain tensors and attributes (stored once in the cache); :class:`TeacherHead` rebuilds the same function
of the final level's tokens from them. Supported: token (CLS) / avg / max / avgmax pooling, LayerNorm or
identity norms and a linear classifier, which covers timm's ViT/DeiT/BEiT-style models and ConvNets with
a plain pooled linear head (ResNet family).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

POOLS = ("token", "avg", "max", "avgmax")


def _norm_tensors(module: nn.Module, prefix: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    if isinstance(module, nn.Identity):
        return {"type": "identity"}, {}
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        tensors = {}
        if module.weight is not None:
            tensors[f"{prefix}.weight"] = module.weight.detach().cpu().float().numpy()
        if module.bias is not None:
            tensors[f"{prefix}.bias"] = module.bias.detach().cpu().float().numpy()
        return {"type": "layernorm", "eps": float(module.eps)}, tensors
    raise ValueError(f"unsupported head norm {type(module).__name__}")


def _pool_rule(model: nn.Module) -> tuple[str, nn.Module, nn.Module]:
    """(pool, norm applied per token before pooling, norm applied after pooling)."""
    pool = getattr(model, "global_pool", None)
    if isinstance(pool, str):  # ViT family
        if getattr(model, "attn_pool", None) is not None or pool not in POOLS:
            raise ValueError(f"unsupported pooling {pool!r} (only {', '.join(POOLS)})")
        return pool, getattr(model, "norm", nn.Identity()), getattr(model, "fc_norm", nn.Identity())
    pool_type = getattr(pool, "pool_type", None)
    if pool_type in ("avg", "max", "avgmax"):  # ConvNet: pooled map, then the classifier (checked by the caller)
        return pool_type, nn.Identity(), nn.Identity()
    raise ValueError(f"unsupported head on {type(model).__name__} (pooled linear heads and ViT heads only)")


def describe_head(model: nn.Module, prefix_tokens: int, tokens_normed: bool) -> "TeacherHead":
    """Read the model's head into a :class:`TeacherHead` (raises ValueError when unsupported)."""
    pool, pre_norm, post_norm = _pool_rule(model)
    linear = model.get_classifier()
    if not isinstance(linear, nn.Linear):
        raise ValueError(f"unsupported classifier {type(linear).__name__} (nn.Linear only)")
    pre_attrs, pre_tensors = _norm_tensors(nn.Identity() if tokens_normed else pre_norm, "pre_norm")
    post_attrs, post_tensors = _norm_tensors(post_norm, "post_norm")
    tensors = {**pre_tensors, **post_tensors, "linear.weight": linear.weight.detach().cpu().float().numpy()}
    if linear.bias is not None:
        tensors["linear.bias"] = linear.bias.detach().cpu().float().numpy()
    attrs = {"pool": pool, "prefix_tokens": prefix_tokens, "pre_norm": pre_attrs, "post_norm": post_attrs}
    return TeacherHead(tensors, attrs)


class TeacherHead(nn.Module):
    """Final-level tokens ``[B, T, D]`` -> logits ``[B, K]``, exactly as the teacher computes them."""

    def __init__(self, tensors: dict[str, np.ndarray], attrs: dict[str, Any]) -> None:
        super().__init__()
        self.attrs = dict(attrs)
        self.pool = attrs["pool"]
        self.prefix_tokens = int(attrs["prefix_tokens"])
        self._names = {name: name.replace(".", "_") for name in tensors}
        for name, value in tensors.items():
            self.register_buffer(self._names[name], torch.as_tensor(np.asarray(value), dtype=torch.float32))

    def tensors(self) -> dict[str, np.ndarray]:
        """The head's tensors under their cache names (inverse of the constructor)."""
        return {name: getattr(self, buffer).cpu().numpy() for name, buffer in self._names.items()}

    def _norm(self, x: torch.Tensor, which: str) -> torch.Tensor:
        spec = self.attrs[which]
        if spec["type"] == "identity":
            return x
        weight = getattr(self, f"{which}_weight", None)
        bias = getattr(self, f"{which}_bias", None)
        return F.layer_norm(x, (x.shape[-1],), weight, bias, spec["eps"])

    def pool_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, T, D]`` -> pooled ``[B, D]`` after the per-token norm, before the pre-logits norm."""
        x = self._norm(tokens, "pre_norm")
        if self.pool == "token":
            return x[:, 0]
        patches = x[:, self.prefix_tokens :]
        if self.pool == "avg":
            return patches.mean(1)
        if self.pool == "max":
            return patches.amax(1)
        return 0.5 * (patches.mean(1) + patches.amax(1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self._norm(self.pool_tokens(tokens.float()), "post_norm")
        return F.linear(x, self.linear_weight, getattr(self, "linear_bias", None))
