"""Discrete-time Gaussian diffusion: noise schedules, timestep respacing, DDPM ancestral and DDIM steps.

Follows DDPM (Ho et al. arXiv 2006.11239), improved DDPM (Nichol & Dhariwal arXiv 2102.09672: cosine
schedule, learned variance, respacing) and DDIM (Song et al. arXiv 2010.02502), with the conventions of
ADM / DiT's `gaussian_diffusion.py` so that official checkpoints sample identically.

effigen time: discrete step k in {0, ..., T-1} (k = T-1 noisiest) is passed to networks as t = k / T, so a
DiT with `time_scale = T` sees the integer k, exactly as the official code feeds it.
All schedule arithmetic is float64, as in the official code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..config import ConfigError


def beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
    """`linear`: DDPM's betas from 1e-4 to 0.02 scaled by 1000 / T; `cosine`: iDDPM eq. 17 (max beta 0.999)."""
    if name == "linear":
        scale = 1000 / num_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)
    if name == "cosine":
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array([min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), 0.999)
                         for i in range(num_timesteps)], dtype=np.float64)
    raise ValueError(f"unknown beta schedule {name!r}; choose linear or cosine")


def space_timesteps(num_timesteps: int, num_steps: int) -> list[int]:
    """The `num_steps` original timesteps kept by respacing, evenly strided with rounding (ADM's
    `space_timesteps` with one section)."""
    if not 1 <= num_steps <= num_timesteps:
        raise ConfigError(f"cannot respace {num_timesteps} diffusion steps into {num_steps}: num_steps = {num_steps} is "
                          f"out of range for this model; it must be 1..{num_timesteps}")
    stride = (num_timesteps - 1) / (num_steps - 1) if num_steps > 1 else 1
    return sorted({round(i * stride) for i in range(num_steps)})


@dataclass
class DiffusionSchedule:
    """Precomputed quantities of one (possibly respaced) schedule, float64 numpy arrays of length T'."""

    betas: np.ndarray
    timesteps: np.ndarray  # the original timestep of each respaced index (what the network sees)
    num_original: int

    @classmethod
    def create(cls, name: str, num_timesteps: int, num_steps: int | None = None) -> "DiffusionSchedule":
        betas = beta_schedule(name, num_timesteps)
        if num_steps is None or num_steps == num_timesteps:
            return cls(betas, np.arange(num_timesteps), num_timesteps)
        kept = space_timesteps(num_timesteps, num_steps)
        alphas_cumprod = np.cumprod(1.0 - betas)
        new_betas, last = [], 1.0
        for k in kept:  # respaced betas reproduce the original alpha_bar at the kept steps
            new_betas.append(1 - alphas_cumprod[k] / last)
            last = alphas_cumprod[k]
        return cls(np.array(new_betas), np.array(kept), num_timesteps)

    def __post_init__(self):
        self.alphas_cumprod = np.cumprod(1.0 - self.betas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.posterior_variance = self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # log of the posterior variance, clipped because it is 0 at the first step
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = self.betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(1.0 - self.betas) / (1.0 - self.alphas_cumprod)

    def __len__(self) -> int:
        return len(self.betas)

    def network_time(self, index: torch.Tensor) -> torch.Tensor:
        """Respaced index (B,) -> effigen time t = original_step / T (B,) float32."""
        original = torch.as_tensor(self.timesteps, device=index.device)[index]
        return original.float() / self.num_original


def gather(values: np.ndarray, index: torch.Tensor, ndim: int) -> torch.Tensor:
    """values[index] as float32, shaped (B, 1, ..., 1) for broadcasting against an ndim tensor."""
    out = torch.from_numpy(values).to(index.device)[index].float()
    return out.view(-1, *([1] * (ndim - 1)))


def predict_x0_from_eps(schedule: DiffusionSchedule, x: torch.Tensor, index: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    ac = gather(schedule.alphas_cumprod, index, x.dim())
    return torch.rsqrt(ac) * x - torch.sqrt(1 / ac - 1) * eps


def predict_eps_from_x0(schedule: DiffusionSchedule, x: torch.Tensor, index: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    ac = gather(schedule.alphas_cumprod, index, x.dim())
    return (torch.rsqrt(ac) * x - x0) / torch.sqrt(1 / ac - 1)


def posterior_mean(schedule: DiffusionSchedule, x0: torch.Tensor, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Mean of q(x_{k-1} | x_k, x_0)."""
    return gather(schedule.posterior_mean_coef1, index, x.dim()) * x0 + gather(schedule.posterior_mean_coef2, index, x.dim()) * x


def model_log_variance(schedule: DiffusionSchedule, index: torch.Tensor, ndim: int, variance_output: torch.Tensor | None) -> torch.Tensor:
    """iDDPM's learned range: interpolate log beta and log posterior variance with v in [-1, 1];
    without a learned output, the fixed `posterior variance` (DDPM's sigma^2 = beta-tilde)."""
    min_log = gather(schedule.posterior_log_variance_clipped, index, ndim)
    if variance_output is None:
        return min_log
    max_log = gather(np.log(schedule.betas), index, ndim)
    fraction = (variance_output + 1) / 2
    return fraction * max_log + (1 - fraction) * min_log


PredictFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
# (x (B, C, ...), respaced index (B,)) -> (epsilon prediction, variance output in [-1, 1] or None)


@torch.no_grad()
def ddim_sample(predict: PredictFn, x: torch.Tensor, schedule: DiffusionSchedule, eta: float = 0.0,
                clip_denoised: bool = False, generator: torch.Generator | None = None, progress=None) -> torch.Tensor:
    """DDIM (Song et al. eq. 12) from the last respaced step down to 0; eta = 0 is deterministic,
    eta = 1 matches DDPM's ancestral variance."""
    for i in reversed(range(len(schedule))):
        index = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        eps, _ = predict(x, index)
        x0 = predict_x0_from_eps(schedule, x, index, eps)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        eps = predict_eps_from_x0(schedule, x, index, x0)
        alpha_bar = gather(schedule.alphas_cumprod, index, x.dim())
        alpha_bar_prev = gather(schedule.alphas_cumprod_prev, index, x.dim())
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        x = x0 * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        if eta > 0 and i > 0:
            x = x + sigma * torch.randn(x.shape, generator=generator).to(x.device)
        if progress is not None:
            progress.update(1)
    return x


@torch.no_grad()
def ddpm_sample(predict: PredictFn, x: torch.Tensor, schedule: DiffusionSchedule, clip_denoised: bool = False,
                generator: torch.Generator | None = None, progress=None, step_noise=None) -> torch.Tensor:
    """Ancestral sampling from p(x_{k-1} | x_k) with the model's (learned or fixed) variance; no noise
    is added at the last step. `step_noise`: optional noises, one per step in loop order (noisiest first), used
    instead of fresh draws (to replay a recorded run)."""
    if step_noise is not None and len(step_noise) < len(schedule):
        raise ValueError(f"step_noise has {len(step_noise)} entries, the schedule {len(schedule)} steps: give one per step")
    for i in reversed(range(len(schedule))):
        index = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        eps, variance_output = predict(x, index)
        x0 = predict_x0_from_eps(schedule, x, index, eps)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        mean = posterior_mean(schedule, x0, x, index)
        log_variance = model_log_variance(schedule, index, x.dim(), variance_output)
        x = mean
        if i > 0:
            z = (torch.randn(x.shape, generator=generator) if step_noise is None
                 else step_noise[len(schedule) - 1 - i]).to(x.device)
            x = x + torch.exp(0.5 * log_variance) * z
        if progress is not None:
            progress.update(1)
    return x
