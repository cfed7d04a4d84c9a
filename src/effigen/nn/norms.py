"""Normalisation layers shared by the transformer generators."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learnable gain (Zhang & Sennrich 2019), computed in fp32 and cast
    back, as LightningDiT's `RMSNorm` (parameter name `weight`)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics; the gain is applied before casting back, so a bf16 input (autocast) gives a bf16 output
        # instead of promoting to fp32 (the same values as LightningDiT's `_norm(x.float()).type_as(x) * weight` in fp32)
        normalized = self.normalize_without_gain(x)
        if normalized is not None:
            return normalized * self.weight.to(x.dtype)
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).type_as(x)

    def normalize_without_gain(self, x: torch.Tensor) -> torch.Tensor | None:
        """bf16 inference: x / rms(x) in bf16, the gain left to the caller (an adaLN block folds it into its (B, 1, D)
        scale: one pass fewer); None otherwise (fp32, training), where `forward` keeps the official arithmetic."""
        if x.dtype != torch.bfloat16 or torch.is_grad_enabled() or self.training:
            return None
        # the norm in one reduction (fp32 accumulation inside the kernel, no fp32 copy of x, which
        # `dtype=torch.float32` would make), the tiny (..., 1) statistics in fp32, then one bf16 pass
        rstd = torch.rsqrt(torch.linalg.vector_norm(x, dim=-1, keepdim=True).float().square_()
                           .div_(x.shape[-1]).add_(self.eps))
        return x * rstd.to(x.dtype)


def make_norm(kind: str, dim: int, affine: bool) -> nn.Module:
    """`layernorm` (eps 1e-6; affine or not) or `rmsnorm` (always with a gain)."""
    if kind == "rmsnorm":
        return RMSNorm(dim)
    if kind == "layernorm":
        return nn.LayerNorm(dim, elementwise_affine=affine, eps=1e-6)
    raise ValueError(f"unknown norm {kind!r}; choose layernorm or rmsnorm")
