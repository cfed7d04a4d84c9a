"""One attention backend for the whole library.

`attention(q, k, v, mask=None)` dispatches to `torch.nn.functional.scaled_dot_product_attention`
(flash / memory-efficient / math kernels chosen by PyTorch; on CPU ~4x faster than hand-written attention)
or to a plain `manual` implementation kept as the numerical reference. On a CPU with AMX or AVX-512 BF16, the
"sdpa" backend runs `cpu_kernels.attention` instead in bf16 inference (no gradients, `nn.layers.fused_dtype`) with no
mask or one shared by every head: the same softmax attention on AMX tiles or `vdpbf16ps`, 1.4-2x (AMX) and 2.5x
(Zen 4) torch's CPU flash kernel at DiT's and VAR's shapes. In bf16 CPU training (gradients wanted, the same masks)
it runs that forward kernel, which also returns the log-sum-exp, and `cpu_kernels.attention_backward`: 2-3x torch's
CPU flash backward at those shapes. `set_attention_backend` switches it
globally, e.g. for a test that every backend gives the same output.

Shapes: q, k, v are (B, heads, L, head_dim); mask is boolean, True where attention is allowed,
broadcastable to (B, heads, L_q, L_k), or a `BlockMask`.

Block-sparse attention (`BlockMask(sizes, pattern)`): the sequence is a run of blocks of the given sizes (the token
maps of a multi-scale model) and a query attends to the keys of its own block only (`"block_diagonal"`, HMAR) or of
every block up to and including its own (`"block_causal"`, VAR). It is computed group by group with the same
backend, never materialising an L x L mask: consecutive small blocks are merged into groups of at least
`min_group` tokens that use a small dense mask (one kernel call instead of many tiny ones), and a large block
attends to its keys without any mask. The cost is that of the allowed (query, key) pairs, e.g. sum of s_k^4 instead
of L^2 for HMAR's block-diagonal pattern.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels
from .layers import Linear, fused_dtype

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


@dataclass(frozen=True)
class BlockMask:
    """A block-sparse self-attention pattern over consecutive blocks of `sizes` tokens (L = sum(sizes))."""

    sizes: tuple[int, ...]
    pattern: Literal["block_diagonal", "block_causal"] = "block_causal"
    # merge consecutive blocks until a group holds this many tokens (small dense masks); None: 64 for block_diagonal,
    # 128 for block_causal (the fastest on a CPU for VAR/HMAR's 155- and 680-token schedules, docs/hmar.md)
    min_group: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "sizes", tuple(int(s) for s in self.sizes))
        if self.pattern not in ("block_diagonal", "block_causal"):
            raise ValueError(f"unknown block pattern {self.pattern!r}; use 'block_diagonal' or 'block_causal'")
        if not self.sizes or min(self.sizes) < 1:
            raise ValueError(f"block sizes must be positive, got {self.sizes}")
        if self.min_group is None:
            object.__setattr__(self, "min_group", 64 if self.pattern == "block_diagonal" else 128)

    @property
    def length(self) -> int:
        return sum(self.sizes)

    def groups(self) -> list[tuple[int, int, list[int]]]:
        """[(start, end, block sizes)]: consecutive blocks merged until a group holds >= min_group tokens."""
        out, start, current = [], 0, []
        for size in self.sizes:
            current.append(size)
            if sum(current) >= self.min_group:
                out.append((start, start + sum(current), current))
                start, current = start + sum(current), []
        if current:
            out.append((start, start + sum(current), current))
        return out

    def dense(self, device=None) -> torch.Tensor:
        """The equivalent (L, L) boolean mask (for tests and reference computations only)."""
        levels = torch.cat([torch.full((s,), i) for i, s in enumerate(self.sizes)]).to(device)
        if self.pattern == "block_diagonal":
            return levels[:, None] == levels[None, :]
        return levels[:, None] >= levels[None, :]


def _group_mask(sizes: list[int], key_offset: int, causal: bool, device) -> torch.Tensor | None:
    """Mask of one group's queries over its keys: None when every pair is allowed (one block)."""
    if len(sizes) == 1:
        return None
    levels = torch.cat([torch.full((s,), i, device=device) for i, s in enumerate(sizes)])
    if causal:  # keys: the `key_offset` tokens of earlier groups (all allowed), then the group's own blocks
        own = levels[:, None] >= levels[None, :]
        return torch.cat((torch.ones(len(levels), key_offset, dtype=torch.bool, device=device), own), dim=1)
    return levels[:, None] == levels[None, :]


class _TrainingAttention(torch.autograd.Function):
    """bf16 CPU attention with gradients on the C kernels: the forward kernel also returns the rows' log-sum-exp,
    from which `cpu_kernels.attention_backward` recomputes the weights (2-3x torch's CPU flash backward, whose bf16
    path is slower than its fp32 one). Where a kernel does not apply (shapes, strides, a per-head mask), torch's own
    CPU flash forward and backward ops run instead, with the same saved tensors."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale):
        result = cpu_kernels.attention(q, k, v, scale, mask=mask, return_lse=True)
        if result is None:
            bias = None if mask is None else torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask, float("-inf"))
            result = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=bias, scale=scale)
        out, lse = result
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask, ctx.scale = mask, scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        grad = grad.to(q.dtype)
        if grad.stride(-1) != 1:
            grad = grad.contiguous()
        grads = cpu_kernels.attention_backward(q, k, v, out, grad, lse, ctx.mask, ctx.scale)
        if grads is None:
            mask = ctx.mask
            bias = None if mask is None else torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask, float("-inf"))
            grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                grad, q, k, v, out, lse, 0.0, False, attn_mask=bias, scale=ctx.scale)
        return (*grads, None, None)


def _kernel_training(q, k, v, mask) -> bool:
    """Whether `_TrainingAttention` takes this call: gradients wanted through bf16 CPU tensors, the AVX-512 BF16
    kernels built and switched on (`cpu_kernels.set_enabled`), no dispatch mode or torch.compile, and a mask (if any)
    shared by every batch element and head. Not on AMX machines: there torch's flash backward runs its products on
    the tiles (oneDNN), which `vdpbf16ps` has not been measured against."""
    return (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
            and q.dtype == k.dtype == v.dtype == torch.bfloat16 and q.device.type == "cpu"
            and (mask is None or (mask.dtype == torch.bool and mask.dim() >= 2 and all(n == 1 for n in mask.shape[:-2])))
            and not torch.compiler.is_compiling() and cpu_kernels.attention_kernels() == ("avx512_bf16",)
            and cpu_kernels.active())


def _dense_attention(q, k, v, mask, scale):
    if _backend == "sdpa":
        if fused_dtype(q) is not None:  # bf16 CPU inference: the C kernel where it applies (masks shared by heads)
            out = cpu_kernels.attention(q, k, v, scale, mask=mask)
            if out is not None:
                return out
        if _kernel_training(q, k, v, mask):  # bf16 CPU training: the kernels' forward and backward
            return _TrainingAttention.apply(q, k, v, mask, scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q.float() @ k.float().transpose(-2, -1)) * scale  # (B, heads, L_q, L_k), statistics in fp32
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: BlockMask,
                           scale: float | None = None) -> torch.Tensor:
    """Self-attention under a `BlockMask`, group by group (see the module docstring)."""
    L = q.shape[-2]
    if L != blocks.length or k.shape[-2] != L:
        raise ValueError(f"block sizes {blocks.sizes} cover {blocks.length} tokens; q has {L}, k has {k.shape[-2]}")
    causal = blocks.pattern == "block_causal"
    out = []
    for start, end, sizes in blocks.groups():
        key_start = 0 if causal else start
        mask = _group_mask(sizes, start - key_start, causal, q.device)
        out.append(_dense_attention(q[..., start:end, :], k[..., key_start:end, :], v[..., key_start:end, :], mask, scale))
    return out[0] if len(out) == 1 else torch.cat(out, dim=-2)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | BlockMask | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention, (B, heads, L, head_dim) -> (B, heads, L, head_dim)."""
    if isinstance(mask, BlockMask):
        return block_sparse_attention(q, k, v, mask, scale)
    return _dense_attention(q, k, v, mask, scale)


def attention_logits(q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Pre-softmax logits q k^T * scale (default 1/sqrt(head_dim)), (B, heads, L_q, L_k), in fp32 and with no mask:
    what the softmax of `attention` sees before masking (a feature tap, `effigen.nn.taps`)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return (q.float() @ k.float().transpose(-2, -1)) * scale


class LayerKVCache:
    """Keys and values of the tokens seen so far by one attention layer, (B, heads, L_seen, head_dim), grown
    along the sequence by `append` (the KV cache of the autoregressive samplers: VAR, raster AR).

    With `capacity` (the most tokens the sequence will hold, e.g. VAR's 680), the first `append` allocates
    (B, heads, capacity, head_dim) buffers and every append writes its keys and values in place and returns views of
    the filled part: each token's keys are copied once, where concatenation copies the whole cache at every step
    (sum over steps of L_seen). Without it (or past it), the cache grows by concatenation. The values are the same
    either way."""

    def __init__(self, capacity: int | None = None):
        self.capacity = capacity
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        self._length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self._length + k.shape[2]
        if self.capacity is not None and end <= self.capacity and (self.k is None or self._buffers is not None):
            if self._buffers is None:
                shape = (k.shape[0], k.shape[1], self.capacity, k.shape[3])
                self._buffers = (k.new_empty(shape), v.new_empty(shape[:3] + v.shape[3:]))
            key_buffer, value_buffer = self._buffers
            if key_buffer.dtype == k.dtype and value_buffer.dtype == v.dtype and key_buffer.shape[:2] == k.shape[:2]:
                key_buffer[:, :, self._length : end].copy_(k)
                value_buffer[:, :, self._length : end].copy_(v)
                self._length = end
                self.k, self.v = key_buffer[:, :, :end], value_buffer[:, :, :end]
                return self.k, self.v
            self._buffers = None  # another dtype or batch than the buffers': concatenate from here on
        self.k = k if self.k is None else torch.cat((self.k, k), dim=2)
        self.v = v if self.v is None else torch.cat((self.v, v), dim=2)
        self._length = end
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
        self.qkv = Linear(dim, 3 * dim, bias=qkv_bias)
        from .norms import make_norm

        self.q_norm = make_norm(norm, self.head_dim, affine=True) if qk_norm else nn.Identity()
        self.k_norm = make_norm(norm, self.head_dim, affine=True) if qk_norm else nn.Identity()
        self.proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, rope=None, logits_tap=None) -> torch.Tensor:
        """`logits_tap`: a callback given this layer's `attention_logits` (a feature tap), or None."""
        B, L, D = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.num_heads, self.head_dim)
        plain_qk = isinstance(self.q_norm, nn.Identity) and isinstance(self.k_norm, nn.Identity)
        rotated = None
        if rope is not None and plain_qk and hasattr(rope, "rotate_qk_fused") and fused_dtype(x, self) is not None:
            rotated = rope.rotate_qk_fused(qkv)  # bf16 CPU inference: one pass of the C kernel, or None
        if rotated is not None:
            q, k = rotated
            v = qkv[:, :, 2].transpose(1, 2)
        elif rope is not None and hasattr(rope, "rotate_tokens_major") and plain_qk:
            # q and k rotated together in the projection's (B, L, 2, heads, head_dim) layout (bit-identical, faster)
            q, k = rope.rotate_tokens_major(qkv[:, :, :2]).permute(2, 0, 3, 1, 4).unbind(0)
            v = qkv[:, :, 2].transpose(1, 2)  # each (B, heads, L, head_dim)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, L, head_dim)
            q, k = self.q_norm(q), self.k_norm(k)
            if rope is not None:
                q, k = rope(q), rope(k)
        if logits_tap is not None:
            logits_tap(attention_logits(q, k))  # (B, heads, L, L)
        out = attention(q, k, v, mask)  # (B, heads, L, head_dim)
        return self.proj(out.transpose(1, 2).reshape(B, L, D))  # (B, L, D)
