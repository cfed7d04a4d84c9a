"""Rectified flow / flow matching (Liu et al. arXiv 2209.03003; Lipman et al. arXiv 2210.02747), with the
timestep sampling and velocity-direction loss of LightningDiT (Yao et al. arXiv 2501.01423).

Convention (DESIGN.md): t = 0 data, t = 1 noise,
    x_t = (1 - t) x_0 + t eps,        target velocity  v = dx_t/dt = eps - x_0,
loss  E || v_theta(x_t, t, y) - v ||^2  (+ optional cosine term 1 - cos(v_theta, v), LightningDiT's
"velocity direction loss"). Timesteps are uniform or logit-normal (SD3; LightningDiT uses
logit-normal(0, 1)). Labels are replaced by the null class with probability `label_dropout` so one
network learns both the conditional and the unconditional field for classifier-free guidance.

Sampling integrates dx/dt = v from t = 1 to t = 0 with the ODE solvers of `effigen.samplers`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..rng import BatchRandom
from ..samplers import SOLVERS, guided_prediction, make_time_grid, number_of_evaluations


@dataclass
class RectifiedFlowConfig:
    time_sampling: Literal["uniform", "logit_normal"] = "logit_normal"
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    label_dropout: float = 0.1
    cosine_loss_weight: float = 0.0  # LightningDiT's velocity-direction loss; 0 disables it


@dataclass
class FlowSamplerConfig:
    solver: Literal["euler", "heun"] = "heun"
    num_steps: int = 25
    cfg_scale: float = 1.0  # constant guidance: uncond + s * (cond - uncond)
    cfg_interval: tuple[float, float] | None = None  # guide only while t in [low, high]
    cfg_channels: int | None = None  # 3 reproduces DiT/SiT/LightningDiT's first-3-channels quirk
    time_shift: float = 1.0


class RectifiedFlow:
    """The rectified-flow objective: `loss(model, batch, random)` for the trainer and `sample(...)`
    for the pipeline. Holds no parameters."""

    config_class = RectifiedFlowConfig
    sampler_config_class = FlowSamplerConfig

    def __init__(self, config: RectifiedFlowConfig, num_classes: int):
        self.config = config
        self.num_classes = num_classes

    def sample_time(self, random: BatchRandom) -> torch.Tensor:
        if self.config.time_sampling == "uniform":
            return random.rand()
        normal = random.randn() * self.config.logit_normal_std + self.config.logit_normal_mean
        return torch.sigmoid(normal)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], random: BatchRandom) -> dict[str, torch.Tensor]:
        x0, labels = batch["images"], batch["labels"]  # (B, C, H, W), (B,)
        noise = random.randn(*x0.shape[1:]).to(x0.dtype)
        t = self.sample_time(random)  # (B,)
        drop = random.rand() < self.config.label_dropout
        labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        t_ = t.view(-1, 1, 1, 1)
        x_t = (1 - t_) * x0 + t_ * noise
        target = noise - x0
        prediction = model(x_t, t, labels).float()
        mse = F.mse_loss(prediction, target)
        out = {"loss": mse, "mse": mse.detach()}
        if self.config.cosine_loss_weight > 0:
            cosine = 1 - F.cosine_similarity(prediction.flatten(1), target.flatten(1), dim=1).mean()
            out["loss"] = mse + self.config.cosine_loss_weight * cosine
            out["cosine"] = cosine.detach()
        return out

    @torch.no_grad()
    def sample(
        self,
        model: nn.Module,
        labels: torch.Tensor,
        shape: tuple[int, ...],
        sampler: FlowSamplerConfig,
        generator: torch.Generator | None = None,
        progress=None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Integrate from noise at t = 1 to t = 0. labels: (B,); shape: (C, H, W) per sample."""
        device = labels.device
        if noise is None:
            # One draw per sample, in order: the images do not depend on the batch size.
            noise = torch.stack([torch.randn(shape, generator=generator) for _ in range(labels.shape[0])])
        x = noise.to(device)

        def velocity(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return guided_prediction(
                model, x_t, t, labels, self.num_classes, sampler.cfg_scale, sampler.cfg_interval, sampler.cfg_channels
            ).float()

        grid = make_time_grid(sampler.num_steps, shift=sampler.time_shift)
        return SOLVERS[sampler.solver](velocity, x, grid, progress=progress)

    def evaluations_per_sample(self, sampler: FlowSamplerConfig) -> int:
        return number_of_evaluations(sampler.solver, sampler.num_steps) * (1 if sampler.cfg_scale == 1.0 else 2)
