"""Euler-Maruyama for reverse-time SDEs on an explicit decreasing time grid (SiT's SDE sampler).

    x_{i+1} = x_i + (t_{i+1} - t_i) * drift(x_i, t_i) + sqrt(g^2(t_i) * |t_{i+1} - t_i|) * z,   z ~ N(0, I)

`drift` is the reverse-time drift (v - g^2/2 * score); the step into t = 0 adds no noise (SiT's "Mean"
last step). Noise is drawn per sample from `generator` so samples do not depend on the batch size.
"""

from __future__ import annotations

from typing import Callable

import torch

from .ode import _batch_time


@torch.no_grad()
def euler_maruyama_sample(
    drift: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    diffusion: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    time_grid: torch.Tensor,
    generator: torch.Generator | None = None,
    progress=None,
) -> torch.Tensor:
    for i in range(len(time_grid) - 1):
        t, t_next = time_grid[i], time_grid[i + 1]
        dt = (t_next - t).item()
        t_batch = _batch_time(t, x)
        x = x + dt * drift(x, t_batch)
        if t_next.item() > 0:
            g2 = diffusion(t_batch).view(-1, *([1] * (x.dim() - 1)))
            z = torch.stack([torch.randn(x.shape[1:], generator=generator) for _ in range(x.shape[0])]).to(x.device)
            x = x + torch.sqrt(g2 * abs(dt)) * z
        if progress is not None:
            progress.update(1)
    return x
