"""Segment-wise samplers for blockwise flow models (BFM, arXiv 2510.21167): the time axis 1 -> 0 is cut into K equal
segments and each segment is integrated with its own step grid, so that a network can switch blocks (and reuse
features) per segment. Stateless functions of an explicit grid, as samplers/ode.py and sde.py.

- `steps_per_segment`: a total step budget N is split as N / K steps per segment. A budget that K does not divide
  is an error naming the nearest budgets that work (no silent rounding: the FLOPs of a setting stay what was asked).
- `segment_grids`: per segment linspace(edge_k, edge_{k+1}, n + 1) in float32 (the official scheduler's grid). For
  the SDE the last segment ends at `last_step` and then 0 (SiT/REPA's final "mean" step).
- `blockwise_euler`: x <- x + (t_next - t) v(x, t, k, j) over every segment k and step j.
- `blockwise_euler_maruyama`: reverse SDE dx = [v - g^2/2 score] dt + g dW with g^2 = norm * t on the linear path
  (norm 2 = the official `compute_diffusion` 2t), i.e. drift = v + (norm / 2) eps_hat with eps_hat = x + (1 - t) v.
  `ending="mean"`: the last interval (last_step -> 0) adds no noise. `ending="official"` reproduces the official
  `sample_sde` exactly: noise on every interval including the last one, then ANOTHER deterministic step of the last
  interval from the new x (the returned sample sits at t = -last_step) [quirk kept for parity].

The state x is kept in float64 (as the official samplers); the network sees float32 inputs and times.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..models.bfm import segment_edges

# velocity(x (B, ...) float32, t (B,) float32, segment k, step j within the segment) -> v (B, ...)
SegmentVelocityFn = Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor]


def steps_per_segment(num_steps: int, segments: int) -> int:
    """N total steps -> N / K per segment; a clear error when K does not divide N."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if num_steps % segments:
        below = (num_steps // segments) * segments
        options = " or ".join(str(n) for n in (below, below + segments) if n >= segments)
        raise ValueError(f"num_steps {num_steps} does not divide among the model's {segments} segments (every "
                         f"segment takes the same number of steps): use {options}")
    return num_steps // segments


def segment_grids(segments: int, steps: int, last_step: float = 0.0) -> list[torch.Tensor]:
    """Decreasing float32 time grids, one per segment, `steps` intervals each. `last_step` > 0: the last segment's
    grid is linspace(edge, last_step, steps) followed by 0 (still `steps` intervals)."""
    edges = segment_edges(segments)
    grids = [torch.linspace(float(edges[k]), float(edges[k + 1]), steps + 1) for k in range(segments)]
    if last_step > 0:
        grids[-1] = torch.cat([torch.linspace(float(edges[-2]), last_step, steps), torch.zeros(1)])
    return grids


def _times(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.to(device=x.device, dtype=torch.float32).expand(x.shape[0])


@torch.no_grad()
def blockwise_euler(velocity: SegmentVelocityFn, x: torch.Tensor, grids: list[torch.Tensor],
                    progress=None) -> torch.Tensor:
    dtype, x = x.dtype, x.double()
    for k, grid in enumerate(grids):
        for j in range(len(grid) - 1):
            t, t_next = grid[j], grid[j + 1]
            v = velocity(x.float(), _times(t, x), k, j)
            x = x + float(t_next - t) * v.double()
            if progress is not None:
                progress.update(1)
    return x.to(dtype)


@torch.no_grad()
def blockwise_euler_maruyama(velocity: SegmentVelocityFn, x: torch.Tensor, grids: list[torch.Tensor],
                             step_noise: Callable[[int], torch.Tensor], diffusion_norm: float = 2.0,
                             ending: str = "mean", progress=None) -> torch.Tensor:
    """`step_noise(i)` -> the standard normal draw (x's shape) of the i-th noisy step, in loop order."""
    if ending not in ("mean", "official"):
        raise ValueError(f"ending must be 'mean' or 'official', got {ending!r}")
    dtype, x = x.dtype, x.double()

    def drift(x: torch.Tensor, t: torch.Tensor, k: int, j: int) -> torch.Tensor:
        v = velocity(x.float(), _times(t, x), k, j).double()
        return v + 0.5 * diffusion_norm * (x + (1 - float(t)) * v)  # v + (g^2 / 2t) * eps_hat, linear path

    draws = 0
    for k, grid in enumerate(grids):
        for j in range(len(grid) - 1):
            t, t_next = grid[j], grid[j + 1]
            dt = float(t_next - t)
            x_new = x + drift(x, t, k, j) * dt
            if float(t_next) > 0 or ending == "official":
                g = (diffusion_norm * float(t)) ** 0.5
                x_new = x_new + g * abs(dt) ** 0.5 * step_noise(draws).to(x.device, torch.float64)
                draws += 1
            x = x_new
            if progress is not None:
                progress.update(1)
    if ending == "official":  # the official loop's extra noiseless repeat of the last interval
        t, t_next = grids[-1][-2], grids[-1][-1]
        x = x + drift(x, t, len(grids) - 1, len(grids[-1]) - 2) * float(t_next - t)
    return x.to(dtype)
