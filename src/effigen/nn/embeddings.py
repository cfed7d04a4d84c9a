"""Embeddings shared by the transformer generators: timestep, class label (with a null class for
classifier-free guidance), patches, and fixed 2-D sin-cos positions."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, (B,) -> (B, dim); cos half first, as in
    DiT/ADM so that official weights see the same features."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class TimestepEmbedder(nn.Module):
    """Sinusoidal features -> Linear-SiLU-Linear (names `mlp.0`, `mlp.2` as in DiT)."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_size).to(self.mlp[0].weight.dtype))


class FourierTimeEmbedder(nn.Module):
    """Gaussian Fourier time features -> Linear-SiLU-Linear (RAE's `GaussianFourierEmbedding`): a frozen random
    frequency vector W ~ N(0, scale^2) of `frequency_size` entries (a buffer `W`, kept in the state dict so a
    checkpoint's frequencies travel with it), features [sin(2 pi t W), cos(2 pi t W)] (sin half first), t in [0, 1]."""

    def __init__(self, hidden_size: int, frequency_size: int = 256, scale: float = 1.0):
        super().__init__()
        self.register_buffer("W", torch.randn(frequency_size) * scale)
        self.mlp = nn.Sequential(
            nn.Linear(2 * frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = 2 * math.pi * t.float()[:, None] * self.W.float()[None]  # (B, frequency_size)
        features = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)  # (B, 2 * frequency_size)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding table with one extra row, index `num_classes`, for the null class used by
    classifier-free guidance. Label dropout is decided by the objective (which owns the randomness),
    so this module is a pure lookup."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, L, D) with a stride-p convolution (`proj`, as timm's PatchEmbed)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # contiguous: the transposed view would make every (B, L, D) op downstream inherit its strides (each LayerNorm
        # then copies its input; 1.15x / 1.5x slower DiT-S/2 forwards in fp32 / bf16 on this CPU); same values
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()  # (B, L, D)


def sincos_2d_positions(dim: int, grid_size: int) -> np.ndarray:
    """Fixed 2-D sin-cos position table (grid_size**2, dim), MAE/DiT layout (w-coordinate half first)."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos positions need a width divisible by 4, got {dim}")
    coords = np.arange(grid_size, dtype=np.float64)
    grid_w, grid_h = np.meshgrid(coords, coords)  # DiT passes (w, h) to the 1-D tables in this order

    def one_dim(positions: np.ndarray, half_dim: int) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(half_dim // 2, dtype=np.float64) / (half_dim / 2.0))
        args = positions.reshape(-1)[:, None] * omega[None]  # (L, half_dim/2)
        return np.concatenate([np.sin(args), np.cos(args)], axis=1)

    return np.concatenate([one_dim(grid_w, dim // 2), one_dim(grid_h, dim // 2)], axis=1)
