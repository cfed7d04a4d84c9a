"""DDPM as DiT trains it: epsilon prediction with a learned variance (the hybrid L_simple + L_vlb loss).

Papers: DDPM (Ho et al. arXiv 2006.11239), improved DDPM (Nichol & Dhariwal arXiv 2102.09672), DiT
(Peebles & Xie arXiv 2212.09748, which trains with this objective on a 1000-step linear schedule).

    x_k = sqrt(alpha_bar_k) x_0 + sqrt(1 - alpha_bar_k) eps,    k ~ U{0, ..., T-1}
    L_simple = || eps - eps_theta(x_k, k) ||^2                     (mean over dimensions)
    L_vlb    = KL( q(x_{k-1} | x_k, x_0) || p_theta(x_{k-1} | x_k) ) in bits per dimension, with the
               mean from a *frozen* eps_theta so that L_vlb trains only the variance (iDDPM sec. 3.1);
               at k = 0 the discretized Gaussian decoder NLL instead.
    loss     = L_simple + L_vlb    (DiT's `create_diffusion` default: learn_sigma=True, MSE loss type)

`prediction` picks what the network's first C channels mean; L_simple is the MSE to that target:
    noise    eps (DDPM, DiT: the default, and what official checkpoints predict)
    velocity v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0 (Salimans & Ho arXiv 2202.00512, sec. 4)
    data     x_0
In terms of the x_0 error, the noise MSE weights noise level k by SNR_k = alpha_bar / (1 - alpha_bar), the
velocity MSE by SNR_k + 1 and the data MSE by 1. On the linear schedule SNR < 0.01 for k > 700, so eps-prediction
barely trains the steps that lay out a pixel-space image's global shape (docs/status.md measures this on MNIST in
pixels); velocity prediction keeps them weighted. Every prediction is converted to eps for the VLB term and the
samplers, so the learned variance, DDIM, DDPM ancestral and guidance work the same for all three.

The network outputs 2C channels when `learn_sigma`: epsilon, then v in [-1, 1] interpolating log beta
and log beta-tilde (iDDPM eq. 15). Sampling: DDIM (any eta) or DDPM ancestral over a respaced schedule
(`samplers/diffusion.py`), with classifier-free guidance on epsilon (optionally DiT's first-3-channels
quirk). Time translation: step k is given to the network as t = k / T (effigen's t in [0, 1], 1 = noise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..rng import BatchRandom
from ..samplers import guided_evaluations, guided_prediction
from ..samplers.diffusion import (
    DiffusionSchedule,
    ddim_sample,
    ddpm_sample,
    gather,
    model_log_variance,
    posterior_mean,
    predict_x0_from_eps,
)


@dataclass
class DDPMConfig:
    num_timesteps: int = 1000
    beta_schedule: Literal["linear", "cosine"] = "linear"
    prediction: Literal["noise", "velocity", "data"] = "noise"
    learn_sigma: bool = True  # hybrid loss; the network must have learn_sigma=True (2C output channels)
    label_dropout: float = 0.1


@dataclass
class DDPMSamplerConfig:
    solver: Literal["ddim", "ddpm"] = "ddim"
    num_steps: int = 50  # respaced steps (DiT's paper FID uses 250 DDPM steps)
    eta: float = 0.0  # DDIM only
    cfg_scale: float = 1.0
    cfg_interval: tuple[float, float] | None = None
    cfg_channels: int | None = None  # 3 reproduces DiT's published numbers
    clip_denoised: bool = False

    def __post_init__(self):  # a ValueError naming the setting and its valid range (config_from_dict: a ConfigError)
        from ..config import check_range
        from ..samplers.guidance import check_guidance, check_num_steps

        check_num_steps(self.num_steps)
        check_range("eta", self.eta, 0, 1, meaning="DDIM noise: 0 = deterministic, 1 = DDPM's ancestral variance")
        check_guidance(self.cfg_scale, self.cfg_interval, self.cfg_channels)


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log p(x) of 8-bit data in [-1, 1] under a Gaussian discretised into 255 bins (DDPM's decoder)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


class GaussianDiffusion:
    config_class = DDPMConfig
    sampler_config_class = DDPMSamplerConfig

    def __init__(self, config: DDPMConfig, num_classes: int):
        self.config = config
        self.num_classes = num_classes
        self.schedule = DiffusionSchedule.create(config.beta_schedule, config.num_timesteps)

    def _split(self, out: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.config.learn_sigma:
            return out, None
        if out.shape[1] != 2 * channels:
            raise ValueError(f"learn_sigma needs a network with {2 * channels} output channels (network.learn_sigma=true), "
                             f"got {out.shape[1]}")
        return out[:, :channels], out[:, channels:]

    def to_noise(self, prediction: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
        """The network's prediction (of `config.prediction`) as an eps prediction; alpha_bar broadcasts to x_t."""
        kind = self.config.prediction
        if kind == "noise":
            return prediction
        if kind == "velocity":  # eps = sqrt(ab) v + sqrt(1 - ab) x_t
            return torch.sqrt(alpha_bar) * prediction + torch.sqrt(1 - alpha_bar) * x_t
        return (x_t - torch.sqrt(alpha_bar) * prediction) * torch.rsqrt(1 - alpha_bar)  # data

    def target(self, x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
        kind = self.config.prediction
        if kind == "noise":
            return noise
        if kind == "velocity":
            return torch.sqrt(alpha_bar) * noise - torch.sqrt(1 - alpha_bar) * x0
        return x0

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], random: BatchRandom) -> dict[str, torch.Tensor]:
        x0, labels = batch["images"], batch["labels"]
        schedule, C = self.schedule, x0.shape[1]
        index = random.randint(len(schedule))  # (B,)
        noise = random.randn(*x0.shape[1:]).to(x0.dtype)
        drop = random.rand() < self.config.label_dropout
        labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        alpha_bar = gather(schedule.alphas_cumprod, index, x0.dim())
        x_t = torch.sqrt(alpha_bar) * x0 + torch.sqrt(1 - alpha_bar) * noise
        prediction, variance_output = self._split(model(x_t, schedule.network_time(index), labels).float(), C)
        target = self.target(x0, noise, alpha_bar)
        mse = ((prediction - target) ** 2).mean(dim=tuple(range(1, x0.dim())))  # (B,)
        out = {"mse": mse.mean().detach()}
        loss = mse
        if variance_output is not None:
            # the variance term sees a frozen mean, so it only trains the variance (iDDPM sec. 3.1)
            eps = self.to_noise(prediction.detach(), x_t, alpha_bar)
            vb = self.variational_bound(x0, x_t, index, eps, variance_output)
            loss = loss + vb
            out["vb"] = vb.mean().detach()
        out["loss"] = loss.mean()
        return out

    def variational_bound(self, x0, x_t, index, eps, variance_output) -> torch.Tensor:
        """Per-sample L_vlb term in bits per dimension, (B,)."""
        schedule, ndim = self.schedule, x0.dim()
        true_mean = posterior_mean(schedule, x0, x_t, index)
        true_log_variance = gather(schedule.posterior_log_variance_clipped, index, ndim)
        model_mean = posterior_mean(schedule, predict_x0_from_eps(schedule, x_t, index, eps), x_t, index)
        log_variance = model_log_variance(schedule, index, ndim, variance_output)
        dims = tuple(range(1, ndim))
        kl = normal_kl(true_mean, true_log_variance, model_mean, log_variance).mean(dim=dims) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * log_variance).mean(dim=dims) / math.log(2.0)
        return torch.where(index == 0, nll, kl)

    @torch.no_grad()
    def sample(self, model: nn.Module, labels: torch.Tensor, shape: tuple[int, ...], sampler: DDPMSamplerConfig,
               generator: torch.Generator | None = None, progress=None, noise: torch.Tensor | None = None,
               step_noise=None) -> torch.Tensor:
        """`step_noise` (ancestral DDPM only): the per-step noises to replay, loop order (see `ddpm_sample`)."""
        device = labels.device
        if noise is None:
            noise = torch.stack([torch.randn(shape, generator=generator) for _ in range(labels.shape[0])])
        x = noise.to(device)
        schedule = DiffusionSchedule.create(self.config.beta_schedule, self.config.num_timesteps, sampler.num_steps)
        C = shape[0]

        def predict(x_t: torch.Tensor, index: torch.Tensor):
            t = schedule.network_time(index)
            # guide epsilon only (never the variance channels), or DiT's first 3 channels
            channels = sampler.cfg_channels if sampler.cfg_channels is not None else C
            out = guided_prediction(model, x_t, t, labels, self.num_classes, sampler.cfg_scale, sampler.cfg_interval,
                                    channels).float()
            prediction, variance_output = self._split(out, C)
            alpha_bar = gather(schedule.alphas_cumprod, index, x_t.dim())
            return self.to_noise(prediction, x_t, alpha_bar), variance_output

        if sampler.solver == "ddim":
            return ddim_sample(predict, x, schedule, sampler.eta, sampler.clip_denoised, generator, progress)
        return ddpm_sample(predict, x, schedule, sampler.clip_denoised, generator, progress, step_noise)

    def evaluations_per_sample(self, sampler: DDPMSamplerConfig) -> int:
        """Network evaluations per image, counting two (conditional + unconditional) only where guidance applies."""
        if sampler.cfg_interval is None or sampler.cfg_scale == 1.0:
            return sampler.num_steps * (1 if sampler.cfg_scale == 1.0 else 2)
        schedule = DiffusionSchedule.create(self.config.beta_schedule, self.config.num_timesteps, sampler.num_steps)
        times = schedule.network_time(torch.arange(sampler.num_steps)).tolist()
        return guided_evaluations(times, sampler.cfg_scale, sampler.cfg_interval)
