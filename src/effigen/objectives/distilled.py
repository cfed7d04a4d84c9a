"""The student method of guided distillation (`dit-distilled`, arXiv 2210.03142): what a distilled student's
output means and how it samples, for flow and DDPM teachers. The student is trained by `effigen.post.distill` (its
module docstring has the paper's equations and every convention); this module holds what the pipeline needs to
sample a student folder: the per-family time grid, step and re-noising (`FlowFamily`, `DiffusionFamily`), the
student's configs and the objective entry `DistilledGenerator`.

Families: flow teachers (`dit-flow`) step with Euler on the velocity over `make_time_grid(N, time_shift, t_start)`;
DDPM teachers (`dit-ddpm`) step with DDIM (eta = 0) over the trailing grid k_j = round(j T / N) - 1. Guidance is
the paper's w (an input of the student, `sampler.guidance_w`; the teacher's cfg_scale = 1 + w): a student takes
no cfg_scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from ..config import ConfigError, config_from_dict
from ..rng import BatchRandom
from ..samplers import make_time_grid
from ..samplers.diffusion import predict_eps_from_x0, predict_x0_from_eps
from .ddpm import DDPMConfig, GaussianDiffusion
from .flow_matching import RectifiedFlow, RectifiedFlowConfig

METHOD = "dit-distilled"


def _bcast(values: torch.Tensor, ndim: int) -> torch.Tensor:
    return values.float().view(-1, *([1] * (ndim - 1)))


# ------------------------------------------------------------------------------------------- families
class FlowFamily:
    """Rectified-flow / SiT teachers: continuous t, Euler on the velocity, loss on the velocity."""

    def __init__(self, objective: RectifiedFlow, time_shift: float = 1.0, sample_eps: float = 1e-3):
        self.objective = objective
        self.prediction = objective.config.prediction
        self.time_shift = time_shift
        self.t_start = 1.0 if self.prediction == "velocity" else 1.0 - sample_eps  # as RectifiedFlow.sample

    def grid(self, num_steps: int) -> torch.Tensor:
        return make_time_grid(num_steps, shift=self.time_shift, t_start=self.t_start).float()  # (N+1,) decreasing

    def train_points(self, random: BatchRandom) -> torch.Tensor:
        return self.objective.sample_time(random)  # (B,)

    def network_time(self, t: torch.Tensor) -> torch.Tensor:
        return t.float()

    def coefficients(self, t: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        alpha, sigma, _, _ = self.objective.path.coefficients(t, ndim)
        return alpha, sigma

    def output(self, out: torch.Tensor, channels: int) -> torch.Tensor:
        return out[:, :channels].float()

    def regression(self, prediction: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The velocity implied by the prediction at (z, t)."""
        if self.prediction == "velocity":
            return prediction
        return self.objective.velocity_and_noise(prediction, z, t)[0]

    def teacher_regression(self, prediction: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.regression(prediction, z, t)  # a flow student keeps its teacher's prediction

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """max(SNR, 1) of the x-space error, expressed on the velocity error (module docstring), (B,)."""
        alpha, sigma, d_alpha, d_sigma = (c.flatten() for c in self.objective.path.coefficients(t, 1))
        return torch.maximum(alpha**2, sigma**2) / (d_alpha * sigma - d_sigma * alpha) ** 2

    def step_regression(self, v: torch.Tensor, z: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return z + _bcast(s - t, z.dim()) * v  # Euler

    def step_target(self, z_t: torch.Tensor, z_s: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return (z_s - z_t) / _bcast(s - t, z_t.dim())


class DiffusionFamily:
    """DDPM teachers: discrete steps k (k = -1 is the data), DDIM steps, loss in x-space."""

    # the teacher objective's `prediction` in this module's names
    KINDS = {"noise": "eps", "velocity": "v", "data": "x"}

    def __init__(self, objective: GaussianDiffusion, parameterization: Literal["teacher", "eps", "x", "v"] = "teacher"):
        self.objective = objective
        self.schedule = objective.schedule
        self.num_timesteps = objective.config.num_timesteps
        self.teacher_parameterization = self.KINDS[objective.config.prediction]
        self.parameterization = self.teacher_parameterization if parameterization == "teacher" else parameterization
        self.alpha_bar = torch.from_numpy(np.append(1.0, self.schedule.alphas_cumprod))  # index k + 1

    def grid(self, num_steps: int) -> torch.Tensor:
        if not 1 <= num_steps <= self.num_timesteps:
            raise ValueError(f"cannot take {num_steps} steps on a {self.num_timesteps}-step diffusion")
        T = self.num_timesteps
        return torch.tensor([round(j * T / num_steps) - 1 for j in range(num_steps, 0, -1)] + [-1])

    def train_points(self, random: BatchRandom) -> torch.Tensor:
        return random.randint(self.num_timesteps)

    def network_time(self, k: torch.Tensor) -> torch.Tensor:
        return self.schedule.network_time(k)  # k / T, the teacher's own convention

    def coefficients(self, k: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        alpha_bar = _bcast(self.alpha_bar.to(k.device)[k.long() + 1], ndim)
        return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()

    def output(self, out: torch.Tensor, channels: int) -> torch.Tensor:
        return out[:, :channels].float()  # never the learned-variance channels

    def regression(self, prediction: torch.Tensor, z: torch.Tensor, k: torch.Tensor, kind: str | None = None) -> torch.Tensor:
        """The x_0 implied by a prediction at (z, k): the student's (`parameterization`) unless `kind` is given."""
        kind = kind or self.parameterization
        if kind == "eps":
            return predict_x0_from_eps(self.schedule, z, k, prediction)
        if kind == "x":
            return prediction
        alpha, sigma = self.coefficients(k, z.dim())
        return alpha * z - sigma * prediction  # from v = alpha eps - sigma x

    def teacher_regression(self, prediction: torch.Tensor, z: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The x_0 implied by the (stage-1) teacher's prediction, in the teacher objective's own parameterisation."""
        return self.regression(prediction, z, k, self.teacher_parameterization)

    def weight(self, k: torch.Tensor) -> torch.Tensor:
        alpha_bar = self.alpha_bar.to(k.device)[k.long() + 1].float()
        return (alpha_bar / (1 - alpha_bar)).clamp(min=1.0)  # truncated SNR, (B,)

    def step_regression(self, x0: torch.Tensor, z: torch.Tensor, k: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        alpha_s, sigma_s = self.coefficients(s, z.dim())
        eps = predict_eps_from_x0(self.schedule, z, k, x0)
        return alpha_s * x0 + sigma_s * eps  # DDIM, eta = 0

    def step_target(self, z_t: torch.Tensor, z_s: torch.Tensor, k: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        alpha_t, sigma_t = self.coefficients(k, z_t.dim())
        alpha_s, sigma_s = self.coefficients(s, z_t.dim())
        ratio = sigma_s / sigma_t
        return (z_s - ratio * z_t) / (alpha_s - ratio * alpha_t)


def step(family, prediction: torch.Tensor, z: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """One deterministic sampler step t -> s from a network prediction at (z, t)."""
    return family.step_regression(family.regression(prediction, z, t), z, t, s)


def renoise(family, z: torch.Tensor, s: torch.Tensor, u: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Forward-diffuse z_s to the noisier time u: q(z_u | z_s) = N((alpha_u/alpha_s) z_s, sigma_u^2 - (alpha_u sigma_s
    / alpha_s)^2), valid for any path whose noise-to-signal ratio grows with time."""
    alpha_s, sigma_s = family.coefficients(s, z.dim())
    alpha_u, sigma_u = family.coefficients(u, z.dim())
    ratio = alpha_u / alpha_s
    return ratio * z + (sigma_u**2 - (ratio * sigma_s) ** 2).clamp(min=0).sqrt() * noise


# ------------------------------------------------------------------------------------------- the student method
@dataclass
class DistilledConfig:
    teacher_method: Literal["dit-flow", "dit-ddpm"] = "dit-flow"
    teacher_objective: dict[str, Any] = field(default_factory=dict)  # the teacher's objective settings (time, prediction)
    parameterization: Literal["teacher", "x", "v"] = "teacher"  # dit-ddpm students only: what the output means
    time_shift: float = 1.0  # flow grid: make_time_grid(N, time_shift, t_start), as the teacher's sampler
    sample_eps: float = 1e-3  # flow grid starts at 1 - sample_eps unless the teacher predicts velocity
    w_min: float = 0.0  # the range of the paper's w the student was trained on (cfg_scale = 1 + w)
    w_max: float = 4.0
    stage: Literal["guidance", "progressive"] = "guidance"  # what produced these weights


@dataclass
class DistilledSamplerConfig:
    num_steps: int = 4  # steps of the distilled grid (one network evaluation each, no CFG doubling)
    guidance_w: float = 1.0  # the paper's w; the teacher's effigen cfg_scale = 1 + guidance_w
    stochastic: bool = False  # the paper's stochastic sampler (double step, then re-noise one step back)

    def __post_init__(self):  # a ValueError naming the setting and its valid range (config_from_dict: a ConfigError)
        from ..config import check_range
        from ..samplers.guidance import check_num_steps

        check_num_steps(self.num_steps)
        check_range("guidance_w", self.guidance_w, meaning="the guidance strength w; the teacher's cfg_scale = 1 + w")

    # what `Pipeline(..., cfg_scale=...)` / `effigen sample --cfg-scale` get told on a student folder
    setting_hints = {
        "cfg_scale": "a distilled student has no cfg_scale: its guidance is the w input it was trained with "
                     "(the teacher's cfg_scale = 1 + w); set it with guidance_w=W (`effigen sample "
                     "--sampler.guidance_w=W`), W within the folder's objective.w_min..w_max",
        "solver": "a distilled student steps on its own grid (deterministic, or `--sampler.stochastic=true`); "
                  "it has no solver setting",
    }


def make_family(config: DistilledConfig, num_classes: int):
    if config.teacher_method == "dit-flow":
        if config.parameterization != "teacher":
            raise ConfigError("parameterization x/v is for dit-ddpm teachers; a flow student keeps its teacher's "
                              "prediction (set it with the teacher's objective.prediction)")
        objective = RectifiedFlow(config_from_dict(RectifiedFlowConfig, config.teacher_objective, "teacher_objective"),
                                  num_classes)
        return FlowFamily(objective, config.time_shift, config.sample_eps)
    objective = GaussianDiffusion(config_from_dict(DDPMConfig, config.teacher_objective, "teacher_objective"), num_classes)
    return DiffusionFamily(objective, config.parameterization)


class DistilledGenerator:
    """The objective entry of method `dit-distilled`: what a distilled student's output means and how it samples.
    It is trained only by `effigen distill` (the stage objectives below), not by `effigen train`."""

    config_class = DistilledConfig
    sampler_config_class = DistilledSamplerConfig

    def __init__(self, config: DistilledConfig, num_classes: int):
        self.config = config
        self.num_classes = num_classes
        self.family = make_family(config, num_classes)

    def loss(self, model, batch, random):
        raise ConfigError("a dit-distilled student is trained by `effigen distill --from TEACHER` (the stage objectives "
                          "GuidanceDistillation / ProgressiveDistillation), not by `effigen train`")

    @torch.no_grad()
    def sample(self, model: nn.Module, labels: torch.Tensor, shape: tuple[int, ...], sampler: DistilledSamplerConfig,
               generator: torch.Generator | None = None, progress=None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """N steps of the student at the fixed w from noise at the grid's start. labels: (B,); shape: (C, H, W)."""
        device = labels.device
        if noise is None:  # one draw per sample, in order, as the other objectives
            noise = torch.stack([torch.randn(shape, generator=generator) for _ in range(labels.shape[0])])
        z = noise.to(device)
        family, N = self.family, sampler.num_steps
        grid = family.grid(N).to(device)
        w = torch.full((labels.shape[0],), float(sampler.guidance_w), device=device)
        for i in range(N):
            t = grid[i].expand(labels.shape[0])
            prediction = family.output(model(z, family.network_time(t), labels, guidance=w), shape[0])
            if sampler.stochastic and i < N - 1:
                z2 = step(family, prediction, z, t, grid[i + 2].expand_as(t))
                fresh = torch.randn(z.shape, generator=generator).to(device)
                z = renoise(family, z2, grid[i + 2].expand_as(t), grid[i + 1].expand_as(t), fresh)
            else:
                z = step(family, prediction, z, t, grid[i + 1].expand_as(t))
            if progress is not None:
                progress.update(1)
        return z

    def evaluations_per_sample(self, sampler: DistilledSamplerConfig) -> int:
        return sampler.num_steps
