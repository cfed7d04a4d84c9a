"""2-D rotary position embedding for image tokens, EVA-02's `VisionRotaryEmbeddingFast` layout as used by
LightningDiT: of each head's channels, the first half rotate with the row index and the second half with the
column index; within a half, adjacent pairs (2i, 2i+1) rotate together at frequency theta^(-2i / half).
The cos/sin tables are persistent buffers (`freqs_cos`, `freqs_sin`, (L, head_dim)) as in the official
checkpoints; `persistent=False` keeps them out of the state dict (BFM's official checkpoints have no RoPE buffers).
"""

from __future__ import annotations

import torch
from torch import nn

from . import cpu_kernels


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(..., 2d) with pairs (a, b) -> (-b, a)."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


class VisionRoPE2D(nn.Module):
    def __init__(self, head_dim: int, grid_size: int, theta: float = 10000.0, persistent: bool = True,
                 rows: int | None = None):
        """A `rows` x `grid_size` grid (default square), read in raster order."""
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2-D RoPE needs a head dimension divisible by 4, got {head_dim}")
        half = head_dim // 2
        inv_freq = 1.0 / theta ** (torch.arange(0, half, 2)[: half // 2].float() / half)  # (half / 2,)
        rows = grid_size if rows is None else rows

        def angles(n: int) -> torch.Tensor:  # (n, half)
            return torch.einsum("p,f->pf", torch.arange(n).float(), inv_freq).repeat_interleave(2, dim=-1)

        row_angles = angles(rows)[:, None, :].expand(rows, grid_size, half)
        col_angles = angles(grid_size)[None, :, :].expand(rows, grid_size, half)
        table = torch.cat([row_angles, col_angles], dim=-1).reshape(rows * grid_size, head_dim)  # (L, head_dim)
        self.register_buffer("freqs_cos", table.cos(), persistent=persistent)
        self.register_buffer("freqs_sin", table.sin(), persistent=persistent)
        self._tables: dict = {}  # (dtype, device, buffer versions) -> (cos, signed sin), not saved

    def _signed_tables(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin in x's dtype, sin with the sign of `rotate_pairs` folded in: (-sin, +sin) on each pair."""
        key = (x.dtype, x.device, self.freqs_cos.data_ptr(), self.freqs_cos._version, self.freqs_sin.data_ptr(),
               self.freqs_sin._version)
        if key not in self._tables:
            sin = self.freqs_sin.unflatten(-1, (-1, 2)) * torch.tensor([-1.0, 1.0], device=self.freqs_sin.device)
            if len(self._tables) > 3:  # stale versions of the buffers
                self._tables.clear()
            self._tables[key] = (self.freqs_cos.to(x.dtype), sin.flatten(-2).to(x.dtype))
        return self._tables[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, heads, L, head_dim)."""
        # the tables in x's dtype: under bf16 autocast q and k stay bf16 instead of promoting to fp32 and back.
        # rotate_pairs(x) * sin = swap_pairs(x) * (-sin, +sin): one pair swap instead of a negation and a stack, the
        # same numbers bit for bit (x * -s == -(x * s) in floating point). q and k arrive as strided views of the qkv
        # projection: one contiguous copy first, then the swap as a stack of the two strided halves, makes the four
        # passes 1.6x faster than on the views with `flip` (DiT-B/2 shapes, bf16, 2 threads; bit-identical)
        cos, signed_sin = self._signed_tables(x)
        x = x.contiguous()
        return x * cos + torch.stack((x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2) * signed_sin

    def rotate_tokens_major(self, x: torch.Tensor) -> torch.Tensor:
        """`forward` for x laid out (B, L, ..., head_dim) with the tokens before the heads, e.g. the q and k slice
        (B, L, 2, heads, head_dim) of a fused qkv projection: both rotated in one set of passes over nearly contiguous
        memory, without transposing them first (2.4x faster than `forward` on q and k separately at DiT-B/2's shapes
        in bf16; the same numbers bit for bit)."""
        cos, signed_sin = self._signed_tables(x)
        shape = (cos.shape[0],) + (1,) * (x.dim() - 3) + (cos.shape[1],)  # (L, 1, ..., 1, head_dim)
        cos, signed_sin = cos.view(shape), signed_sin.view(shape)
        return x * cos + torch.stack((x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2) * signed_sin

    def rotate_qk_fused(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """q and k of a bf16 qkv projection (B, L, 3, heads, head_dim), rotated in one pass of the C kernel of
        `cpu_kernels` (fp32 tables, one rounding: 9x faster than `rotate_tokens_major` at LightningDiT-B/2's shapes and
        closer to the fp32 result), each returned as (B, heads, L, head_dim); None where the kernel does not apply."""
        if qkv.dtype != torch.bfloat16:
            return None
        cos, signed_sin = self._signed_tables(qkv.new_empty((), dtype=torch.float32))
        rotated = cpu_kernels.rope_qk(qkv, cos, signed_sin)
        return None if rotated is None else (rotated[0], rotated[1])
