"""Stateless ODE solvers for flow models with an explicit time grid.

effigen's time convention (DESIGN.md): t in [0, 1], t = 0 is data, t = 1 is noise, and a flow model
predicts the velocity v = dx/dt. Sampling integrates dx/dt = v(x, t) from t = 1 down to t = 0 over a
decreasing grid; each solver is one function of (velocity_fn, x, time_grid).
"""

from __future__ import annotations

from typing import Callable

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x (B, ...), t (B,)) -> v (B, ...)


def make_time_grid(num_steps: int, shift: float = 1.0, t_start: float = 1.0, t_end: float = 0.0) -> torch.Tensor:
    """A decreasing grid of `num_steps + 1` times from t_start to t_end.

    `shift` > 1 spends more steps near the noise end (SD3 / LightningDiT timestep shift):
    t' = shift * t / (1 + (shift - 1) * t).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    t = torch.linspace(t_start, t_end, num_steps + 1, dtype=torch.float64)
    if shift != 1.0:
        t = shift * t / (1 + (shift - 1) * t)
    return t


def _batch_time(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.to(device=x.device, dtype=torch.float32).expand(x.shape[0])


@torch.no_grad()
def euler_sample(velocity_fn: VelocityFn, x: torch.Tensor, time_grid: torch.Tensor, progress=None) -> torch.Tensor:
    """First-order Euler: x_{i+1} = x_i + (t_{i+1} - t_i) v(x_i, t_i). One evaluation per step."""
    for i in range(len(time_grid) - 1):
        t, t_next = time_grid[i], time_grid[i + 1]
        x = x + (t_next - t).item() * velocity_fn(x, _batch_time(t, x))
        if progress is not None:
            progress.update(1)
    return x


@torch.no_grad()
def heun_sample(velocity_fn: VelocityFn, x: torch.Tensor, time_grid: torch.Tensor, progress=None,
                pass_step_start: bool = False) -> torch.Tensor:
    """Second-order Heun (trapezoidal predictor-corrector, EDM Alg. 1 without churn). The last step
    to t = 0 is plain Euler, as in EDM, so a grid of N steps costs 2N - 1 evaluations. `pass_step_start`: the
    corrector is called as `velocity_fn(x, t_next, t_start)` (for settings decided once per step, e.g. REPA's
    guidance interval)."""
    for i in range(len(time_grid) - 1):
        t, t_next = time_grid[i], time_grid[i + 1]
        dt = (t_next - t).item()
        v = velocity_fn(x, _batch_time(t, x))
        x_euler = x + dt * v
        if t_next.item() == 0.0:
            x = x_euler
        else:
            start = (_batch_time(t, x),) if pass_step_start else ()
            v_next = velocity_fn(x_euler, _batch_time(t_next, x), *start)
            x = x + dt * 0.5 * (v + v_next)
        if progress is not None:
            progress.update(1)
    return x


SOLVERS = {"euler": euler_sample, "heun": heun_sample}


def number_of_evaluations(solver: str, num_steps: int) -> int:
    """Network evaluations per sample (before the 2x of classifier-free guidance)."""
    return num_steps if solver == "euler" else 2 * num_steps - 1
