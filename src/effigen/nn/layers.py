"""Small blocks shared across networks: adaLN modulation and the transformer MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def modulate(x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift, with (B, D) conditioning broadcast over tokens of x (B, L, D);
    `shift=None` for scale-only modulation (LightningDiT's `wo_shift`)."""
    x = x * (1 + scale.unsqueeze(1))
    return x if shift is None else x + shift.unsqueeze(1)


class Mlp(nn.Module):
    """Linear-GELU(tanh)-Linear, names `fc1`/`fc2` as timm's Mlp (DiT's checkpoints use them)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): w3(silu(x W1) * x W2) with W1, W2 fused as `w12` (the
    xformers/LightningDiT layout, biases on). LightningDiT sizes the hidden layer int(2/3 * 4 * D) so the
    parameter count equals the GELU MLP's."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden_dim)
        self.w3 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability p (scaled by 1/(1-p)) in training."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)
