"""Normalisation layers shared by the transformer generators."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learnable gain (Zhang & Sennrich 2019), computed in fp32 and cast
    back, as LightningDiT's `RMSNorm` (parameter name `weight`)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def make_norm(kind: str, dim: int, affine: bool) -> nn.Module:
    """`layernorm` (eps 1e-6; affine or not) or `rmsnorm` (always with a gain)."""
    if kind == "rmsnorm":
        return RMSNorm(dim)
    if kind == "layernorm":
        return nn.LayerNorm(dim, elementwise_affine=affine, eps=1e-6)
    raise ValueError(f"unknown norm {kind!r}; choose layernorm or rmsnorm")
