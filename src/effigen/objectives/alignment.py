"""Representation alignment of a generator's hidden tokens to a frozen teacher: REPA (arXiv 2410.06940) and HASTE
(arXiv 2505.16792). (The objective wrapper follows below the projector.)"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ProjectorConfig:
    in_dim: int = 1152  # the generator's hidden size
    hidden_dim: int = 2048  # REPA's projector_dim
    out_dims: tuple[int, ...] = (768,)  # one projector per teacher (REPA's z_dims), each to that teacher's width


class Projectors(nn.Module):
    """REPA's projectors: per teacher an MLP Linear(D, 2048) - SiLU - Linear(2048, 2048) - SiLU - Linear(2048, C)
    from the generator's hidden tokens to the teacher's feature width. Parameter names follow the official
    `models/sit.py` (`projectors.0.0.weight`, `projectors.0.2.weight`, `projectors.0.4.weight`), so the projectors
    of a released REPA checkpoint load as they are. A pipeline component (saved with training state, dropped from
    the sampling folder unless kept on purpose)."""

    config_class = ProjectorConfig

    def __init__(self, config: ProjectorConfig):
        super().__init__()
        self.config = config
        self.projectors = nn.ModuleList(
            nn.Sequential(nn.Linear(config.in_dim, config.hidden_dim), nn.SiLU(),
                          nn.Linear(config.hidden_dim, config.hidden_dim), nn.SiLU(),
                          nn.Linear(config.hidden_dim, out_dim))
            for out_dim in config.out_dims
        )

    def forward(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """(B, N, D) -> one (B, N, C_k) tensor per teacher."""
        return [projector(tokens) for projector in self.projectors]
