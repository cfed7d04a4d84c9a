"""Flow matching with SiT's interpolants: rectified flow (Liu et al. arXiv 2209.03003; Lipman et al. arXiv
2210.02747), the GVP path and noise/score prediction of SiT (Ma et al. arXiv 2401.08740), and the timestep
sampling and velocity-direction loss of LightningDiT (Yao et al. arXiv 2501.01423).

Convention (DESIGN.md): t = 0 data, t = 1 noise,
    x_t = alpha_t x_0 + sigma_t eps,    linear: alpha = 1 - t, sigma = t    GVP: alpha = cos(pi t / 2), sigma = sin(pi t / 2)
    velocity v = dx_t/dt = alpha'_t x_0 + sigma'_t eps          (linear: v = eps - x_0)
The network predicts `velocity`, `noise` (eps) or `score` (-eps / sigma_t), with the MSE to that target as loss,
or `data` (x_0, as JiT, Li & He arXiv 2511.13720: a pixel-space transformer predicts the clean image far more
easily than noise or velocity), whose prediction is converted to a velocity and trained with the velocity MSE
(sigma_t clamped at `data_prediction_min_sigma` in the conversion). An optional cosine term
1 - cos(v_theta, v) is LightningDiT's velocity-direction loss.
Timesteps are uniform or logit-normal (SD3; LightningDiT uses logit-normal(0, 1)). Labels are replaced by the
null class with probability `label_dropout` so one network learns both fields for classifier-free guidance.

Sampling converts any prediction to (velocity, noise) and integrates from t = 1 to t = 0: the probability-flow
ODE with Euler or Heun, or SiT's reverse SDE with Euler-Maruyama,
    dx = [v - (g_t^2 / 2) score] dt + g_t dW   (dt < 0),
which has the same marginals as the ODE for any g; here g_t^2 = diffusion_norm * sigma_t, so the drift is
v + (diffusion_norm / 2) eps (no singularity at t = 0), and a last noiseless "Mean" step of size `last_step` (SiT's
default 0.04). SiT's "sigma" diffusion is g_t^2 = 2 * norm * sigma_t with its own `diffusion_norm` (default 1), and
REPA's is 2t: both are effigen's diffusion_norm = 2 (the converters set it); effigen's default 1 is half their noise
(checked against SiT's integrator in tests/parity/test_sit_parity.py).
Noise and score predictions are singular where alpha_t = 0 (t = 1), so their grid starts at 1 - `sample_eps`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..rng import BatchRandom
from ..samplers import SOLVERS, guided_evaluations, guided_prediction, make_time_grid
from ..samplers.ode import heun_sample
from ..samplers.sde import euler_maruyama_sample


@dataclass
class RectifiedFlowConfig:
    path: Literal["linear", "gvp"] = "linear"
    prediction: Literal["velocity", "noise", "score", "data"] = "velocity"
    time_sampling: Literal["uniform", "logit_normal"] = "logit_normal"
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    label_dropout: float = 0.1
    cosine_loss_weight: float = 0.0  # LightningDiT's velocity-direction loss; 0 disables it
    train_eps: float = 0.0  # keep t in [train_eps, 1 - train_eps] (SiT uses 1e-5 for noise/score targets)
    data_prediction_min_sigma: float = 0.05  # "data" prediction: clamp sigma_t when converting x_0 to velocity


@dataclass
class FlowSamplerConfig:
    solver: Literal["euler", "heun", "euler_maruyama"] = "heun"
    num_steps: int = 25
    cfg_scale: float = 1.0  # constant guidance: uncond + s * (cond - uncond)
    cfg_interval: tuple[float, float] | None = None  # guide only while t in [low, high]
    # which time decides the interval for Heun's corrector: its own ("evaluation") or its step's start ("step_start",
    # REPA's euler_sampler with heun)
    cfg_interval_at: Literal["evaluation", "step_start"] = "evaluation"
    cfg_channels: int | None = None  # 3 reproduces DiT/SiT/LightningDiT's first-3-channels quirk
    time_shift: float = 1.0
    diffusion_norm: float = 1.0  # SDE only: g_t^2 = diffusion_norm * sigma_t (SiT's and REPA's SDE: 2)
    last_step: float = 0.04  # SDE only: final noiseless step to t = 0
    sample_eps: float = 1e-3  # start at 1 - sample_eps for noise/score predictions

    def __post_init__(self):  # a ValueError naming the setting and its valid range (config_from_dict: a ConfigError)
        from ..config import check_range
        from ..samplers.guidance import check_guidance, check_num_steps

        check_num_steps(self.num_steps)
        check_guidance(self.cfg_scale, self.cfg_interval, self.cfg_channels)
        check_range("time_shift", self.time_shift, 0, low_open=True, meaning="1 = uniform steps, > 1 more steps near noise")
        check_range("diffusion_norm", self.diffusion_norm, 0, meaning="SDE noise scale")
        check_range("last_step", self.last_step, 0, 1, high_open=True, meaning="SDE: final noiseless step to t = 0")
        check_range("sample_eps", self.sample_eps, 0, 1, high_open=True, meaning="start at t = 1 - sample_eps")


class Path:
    """alpha_t, sigma_t and their time derivatives, broadcast to x's shape."""

    def __init__(self, kind: str):
        self.kind = kind

    def coefficients(self, t: torch.Tensor, ndim: int):
        t = t.float().view(-1, *([1] * (ndim - 1)))
        if self.kind == "linear":
            return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
        half_pi = math.pi / 2
        return torch.cos(half_pi * t), torch.sin(half_pi * t), -half_pi * torch.sin(half_pi * t), half_pi * torch.cos(half_pi * t)


class RectifiedFlow:
    """The flow-matching objective: `loss(model, batch, random)` for the trainer and `sample(...)` for the
    pipeline. Holds no parameters."""

    config_class = RectifiedFlowConfig
    sampler_config_class = FlowSamplerConfig

    def __init__(self, config: RectifiedFlowConfig, num_classes: int):
        self.config = config
        self.num_classes = num_classes
        self.path = Path(config.path)

    def sample_time(self, random: BatchRandom) -> torch.Tensor:
        if self.config.time_sampling == "uniform":
            t = random.rand()
        else:
            t = torch.sigmoid(random.randn() * self.config.logit_normal_std + self.config.logit_normal_mean)
        eps = self.config.train_eps
        return t * (1 - 2 * eps) + eps if eps > 0 else t

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma, d_alpha, d_sigma = self.path.coefficients(t, x0.dim())
        if self.config.prediction in ("velocity", "data"):  # data prediction is trained in velocity space
            return d_alpha * x0 + d_sigma * noise
        if self.config.prediction == "noise":
            return noise
        return -noise / sigma  # score of p(x_t | x_0)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], random: BatchRandom) -> dict[str, torch.Tensor]:
        x0, labels = batch["images"], batch["labels"]  # (B, C, H, W), (B,)
        noise = random.randn(*x0.shape[1:]).to(x0.dtype)
        t = self.sample_time(random)  # (B,)
        drop = random.rand() < self.config.label_dropout
        labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        alpha, sigma, _, _ = self.path.coefficients(t, x0.dim())
        x_t = alpha * x0 + sigma * noise
        target = self.target(x0, noise, t)
        prediction = model(x_t, t, labels).float()
        if self.config.prediction == "data":  # x-prediction, velocity loss
            prediction = self.velocity_and_noise(prediction, x_t, t)[0]
        mse = F.mse_loss(prediction, target)
        out = {"loss": mse, "mse": mse.detach()}
        if self.config.cosine_loss_weight > 0:
            cosine = 1 - F.cosine_similarity(prediction.flatten(1), target.flatten(1), dim=1).mean()
            out["loss"] = mse + self.config.cosine_loss_weight * cosine
            out["cosine"] = cosine.detach()
        return out

    def velocity_and_noise(self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Convert the network's prediction at (x_t, t) into (velocity, noise) estimates."""
        alpha, sigma, d_alpha, d_sigma = self.path.coefficients(t, x_t.dim())
        if self.config.prediction == "velocity":
            velocity = prediction
            # solve x_t = alpha x0 + sigma eps, v = alpha' x0 + sigma' eps for eps
            noise = (alpha * velocity - d_alpha * x_t) / (alpha * d_sigma - d_alpha * sigma)
            return velocity, noise
        if self.config.prediction == "data":
            x0 = prediction
            noise = (x_t - alpha * x0) / sigma.clamp(min=self.config.data_prediction_min_sigma)
            return d_alpha * x0 + d_sigma * noise, noise
        noise = prediction if self.config.prediction == "noise" else -sigma * prediction
        x0 = (x_t - sigma * noise) / alpha
        return d_alpha * x0 + d_sigma * noise, noise

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

        def predict(x_t: torch.Tensor, t: torch.Tensor, interval_time: torch.Tensor | None = None) -> torch.Tensor:
            return self.guided_output(model, x_t, t, labels, sampler, interval_time).float()

        def velocity(x_t: torch.Tensor, t: torch.Tensor, interval_time: torch.Tensor | None = None) -> torch.Tensor:
            out = predict(x_t, t, interval_time)
            return out if self.config.prediction == "velocity" else self.velocity_and_noise(out, x_t, t)[0]

        t_start = 1.0 if self.config.prediction == "velocity" else 1.0 - sampler.sample_eps
        shift = self.sampling_shift(sampler, shape)
        if sampler.solver == "euler_maruyama":
            grid = make_time_grid(sampler.num_steps, shift=shift, t_start=t_start, t_end=sampler.last_step)
            grid = torch.cat([grid, grid.new_zeros(1)]) if sampler.last_step > 0 else grid

            def drift(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                v, eps = self.velocity_and_noise(predict(x_t, t), x_t, t)
                return v + 0.5 * sampler.diffusion_norm * eps  # v - (g^2 / 2) score with g^2 = norm * sigma

            def diffusion(t: torch.Tensor) -> torch.Tensor:
                return sampler.diffusion_norm * self.path.coefficients(t, 1)[1].flatten()

            return euler_maruyama_sample(drift, diffusion, x, grid, generator, progress)
        grid = make_time_grid(sampler.num_steps, shift=shift, t_start=t_start, t_end=getattr(sampler, "t_end", 0.0))
        if sampler.solver == "heun" and sampler.cfg_interval_at == "step_start":
            return heun_sample(velocity, x, grid, progress=progress, pass_step_start=True)
        return SOLVERS[sampler.solver](velocity, x, grid, progress=progress)

    def guided_output(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
                      sampler: FlowSamplerConfig, interval_time: torch.Tensor | None = None) -> torch.Tensor:
        """The network's (guided) output at (x_t, t) under the sampler's guidance settings (classifier-free here;
        subclasses add other kinds, e.g. RAE's autoguidance)."""
        return guided_prediction(model, x_t, t, labels, self.num_classes, sampler.cfg_scale, sampler.cfg_interval,
                                 sampler.cfg_channels, interval_time)

    def sampling_shift(self, sampler: FlowSamplerConfig, shape: tuple[int, ...] | None = None) -> float:
        """The time shift of the sampling grid (subclasses may derive it from the latent shape)."""
        return sampler.time_shift

    def evaluations_per_sample(self, sampler: FlowSamplerConfig, shift: float | None = None) -> int:
        """Network evaluations per image, counting two (conditional + unconditional) only where guidance applies."""
        t_start = 1.0 if self.config.prediction == "velocity" else 1.0 - sampler.sample_eps
        shift = self.sampling_shift(sampler) if shift is None else shift
        if sampler.solver == "euler_maruyama":
            grid = make_time_grid(sampler.num_steps, shift=shift, t_start=t_start, t_end=sampler.last_step)
            grid = torch.cat([grid, grid.new_zeros(1)]) if sampler.last_step > 0 else grid
        else:
            grid = make_time_grid(sampler.num_steps, shift=shift, t_start=t_start, t_end=getattr(sampler, "t_end", 0.0))
        times = grid.tolist()
        decisions = times[:-1]  # the predictor / Euler evaluation of each step
        if sampler.solver == "heun":  # the corrector, except on the last step to t = 0
            step_start = sampler.cfg_interval_at == "step_start"
            decisions += [times[i] if step_start else times[i + 1] for i in range(len(times) - 1) if times[i + 1] != 0.0]
        return guided_evaluations(decisions, sampler.cfg_scale, sampler.cfg_interval)
