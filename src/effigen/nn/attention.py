"""One attention backend for the whole library.

`attention(q, k, v, mask=None)` dispatches to `torch.nn.functional.scaled_dot_product_attention`
(flash / memory-efficient / math kernels chosen by PyTorch; on CPU ~4x faster than hand-written attention)
or to a plain `manual` implementation kept as the numerical reference. `set_attention_backend` switches it
globally, e.g. for a test that every backend gives the same output.

Shapes: q, k, v are (B, heads, L, head_dim); mask is boolean, True where attention is allowed,
broadcastable to (B, heads, L_q, L_k).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

BACKENDS = ("sdpa", "manual")
_backend = "sdpa"


def set_attention_backend(name: str) -> None:
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKENDS}")
    _backend = name


@contextmanager
def attention_backend(name: str):
    previous = _backend
    set_attention_backend(name)
    try:
        yield
    finally:
        set_attention_backend(previous)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention, (B, heads, L, head_dim) -> (B, heads, L, head_dim)."""
    if _backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q.float() @ k.float().transpose(-2, -1)) * scale  # (B, heads, L_q, L_k), statistics in fp32
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)


class LayerKVCache:
    """Keys and values of the tokens seen so far by one attention layer, (B, heads, L_seen, head_dim), grown
    along the sequence by `append` (the KV cache of the autoregressive samplers: VAR, raster AR)."""

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat((self.k, k), dim=2)
        self.v = v if self.v is None else torch.cat((self.v, v), dim=2)
        return self.k, self.v


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (parameter names as timm's `Attention`:
    `qkv`, `proj`, optional `q_norm`/`k_norm`), so official DiT-family checkpoints load without renaming."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False, norm: str = "layernorm"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        from .norms import make_norm

        self.q_norm = make_norm(norm, self.head_dim, affine=True) if qk_norm else nn.Identity()
        self.k_norm = make_norm(norm, self.head_dim, affine=True) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, rope=None) -> torch.Tensor:
        B, L, D = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, L, head_dim)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        out = attention(q, k, v, mask)  # (B, heads, L, head_dim)
        return self.proj(out.transpose(1, 2).reshape(B, L, D))  # (B, L, D)
