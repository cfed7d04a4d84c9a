"""RAE stage 2: flow matching in a representation autoencoder's latent space with DiT^DH (Zheng et al., "Diffusion
Transformers with Representation Autoencoders", arXiv 2510.11690; code bytetriper/RAE `src/stage2/transport/`,
`src/stage2/models/DDT.py`, `src/sample_ddp.py`).

The objective is effigen's rectified flow (objectives/flow_matching.py: linear path, velocity prediction, plain MSE,
t = 0 data, t = 1 noise, which is also RAE's direction) with two of RAE's additions:

- the **dimension-dependent time shift** (paper Sec. 5, `transport.py`): training times t ~ logit-normal(0, 1) (or
  uniform) and the sampler's grid are both mapped by
      t' = s t / (1 + (s - 1) t),    s = sqrt(dim / base),  dim = C h w of the latent,  base = 4096
  (RAE: 16 x 16 x 768 / 4096 -> s = sqrt(48) = 6.93; base 4096 is the 32 x 32 x 4 SD-VAE latent). s > 1 moves mass
  toward noise. **Policy for s < 1** (latents smaller than `shift_base`, e.g. MNIST's 7 x 7 x 64 = 3136): the
  official code asserts s >= 1; effigen clamps to s = 1 (uniform, no shift) by default (`shift_below_one="clamp"`),
  because s < 1 moves mass toward the data end, the opposite of what the shift is for, and a latent smaller than the
  base needs no extra noise; `"allow"` uses s < 1 as the formula gives it, `"error"` refuses it like the official
  code. `shift_dim` (0 = C h w of the data) and `shift_base` are settings, so a small latent can be given RAE's
  relative shift (e.g. base = dim / 48).
- **autoguidance** (Karras et al. 2406.02507; RAE's best FID): `sampler.guidance="autoguidance"` guides with a
  smaller, less trained model of the same task, the folder's `guidance_model` component (a DiT / DiT^DH of the same
  latent; `effigen convert rae-official --guidance-ckpt`, or `convert.rae_official.attach_guidance_model` from
  another pipeline folder),
  out = guide + s (model - guide) inside the guidance interval [t_min, t_max] (t of each sample), else the model's
  output. `guidance="cfg"` is classifier-free guidance on all channels with the same per-sample interval.

Stage 1 (the tokenizer, `tokenizers/rae.py`): `RAEDecoderLoss` trains the ViT decoder on the frozen encoder's
noise-augmented latent with L1 + perceptual + GAN terms (below).

Sampler's `time_shift = 0` means "the training shift" (the dimension-dependent s above, from the generator's latent
shape); any positive value is used as given. `t_end`: the grid's last point before shifting (the official Euler grid
stops at 1/1000, and the sample is the state there, with no final step to 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..config import ConfigError, check_range
from ..rng import BatchRandom
from ..samplers.guidance import autoguided_prediction, check_guidance, check_num_steps
from .autoencoder import AutoencoderLoss
from .flow_matching import FlowSamplerConfig, RectifiedFlow, RectifiedFlowConfig
from .next_scale import unwrap

SHIFT_BASE = 4096  # 32 x 32 x 4, the SD-VAE latent the SD3-style shift was tuned for


def dimension_shift(dim: int, base: float = SHIFT_BASE, below_one: str = "clamp") -> float:
    """RAE's s = sqrt(dim / base) with effigen's policy where s < 1 (module docstring): "clamp" -> 1, "allow" -> s,
    "error" -> ValueError."""
    if dim <= 0 or base <= 0:
        raise ValueError(f"the shift needs a positive latent dimension and base, got dim={dim}, base={base}")
    shift = math.sqrt(dim / base)
    if shift >= 1 or below_one == "allow":
        return shift
    if below_one == "clamp":
        return 1.0
    raise ValueError(f"the dimension-dependent shift sqrt({dim} / {base}) = {shift:.4g} is below 1 (a latent smaller "
                     "than shift_base): lower shift_base, or set shift_below_one to clamp (s = 1) or allow")


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """t' = s t / (1 + (s - 1) t) (t = 1 noise): s > 1 moves times toward noise, s = 1 is the identity."""
    return t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)


@dataclass
class RAEFlowConfig(RectifiedFlowConfig):
    shift_dim: int = 0  # the latent dimension of the shift; 0 = C * h * w of the training latents
    shift_base: float = SHIFT_BASE
    shift_below_one: Literal["clamp", "allow", "error"] = "clamp"

    def __post_init__(self):
        check_range("shift_dim", self.shift_dim, 0, meaning="0 = C h w of the latents")
        check_range("shift_base", self.shift_base, 0, low_open=True, meaning="s = sqrt(dim / shift_base)")


@dataclass
class RAESamplerConfig(FlowSamplerConfig):
    solver: Literal["euler", "heun", "euler_maruyama"] = "euler"
    num_steps: int = 50  # RAE: ODE Euler, 50 steps
    time_shift: float = 0.0  # 0 = the dimension-dependent training shift; > 0 as given
    guidance: Literal["cfg", "autoguidance"] = "cfg"
    t_end: float = 0.0  # the grid's last time before shifting (official: 1/1000, no final step to 0)

    def __post_init__(self):
        check_num_steps(self.num_steps)
        check_guidance(self.cfg_scale, self.cfg_interval, self.cfg_channels)
        check_range("time_shift", self.time_shift, 0, meaning="0 = the dimension-dependent shift of the training")
        check_range("t_end", self.t_end, 0, 1, high_open=True, meaning="the sampling grid's last time")
        check_range("diffusion_norm", self.diffusion_norm, 0, meaning="SDE noise scale")
        check_range("last_step", self.last_step, 0, 1, high_open=True, meaning="SDE: final noiseless step to t = 0")
        check_range("sample_eps", self.sample_eps, 0, 1, high_open=True, meaning="start at t = 1 - sample_eps")
        if self.guidance == "autoguidance" and self.cfg_channels is not None:
            raise ValueError("autoguidance guides every channel: leave cfg_channels null")


class RAEFlow(RectifiedFlow):
    """Rectified flow with RAE's dimension-dependent shift and autoguidance (module docstring)."""

    config_class = RAEFlowConfig
    sampler_config_class = RAESamplerConfig
    extra_components = ("guidance_model",)
    evaluations_need_model = True  # the default shift comes from the generator's latent shape

    def __init__(self, config: RAEFlowConfig, num_classes: int, guidance_model: nn.Module | None = None):
        super().__init__(config, num_classes)
        self.guidance_model = guidance_model
        self._train_shift = 1.0

    def shift_for(self, shape: tuple[int, ...]) -> float:
        """The dimension-dependent shift of latents of per-sample `shape` (C, h, w)."""
        return dimension_shift(self.config.shift_dim or math.prod(shape), self.config.shift_base,
                               self.config.shift_below_one)

    def sample_time(self, random: BatchRandom) -> torch.Tensor:
        return shift_time(super().sample_time(random), self._train_shift)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], random: BatchRandom) -> dict[str, torch.Tensor]:
        self._train_shift = self.shift_for(tuple(batch["images"].shape[1:]))
        return super().loss(model, batch, random)

    def sampling_shift(self, sampler: RAESamplerConfig, shape: tuple[int, ...] | None = None) -> float:
        if sampler.time_shift > 0:
            return sampler.time_shift
        if shape is None:
            raise ValueError("time_shift = 0 takes the shift from the latent shape; give the shape")
        return self.shift_for(shape)

    def guided_output(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
                      sampler: RAESamplerConfig, interval_time: torch.Tensor | None = None) -> torch.Tensor:
        if getattr(sampler, "guidance", "cfg") != "autoguidance":
            return super().guided_output(model, x_t, t, labels, sampler, interval_time)
        if self.guidance_model is None:
            raise ConfigError("sampler.guidance=autoguidance needs a guidance model: this folder has no "
                              "`guidance_model` component (add one with effigen.convert.rae_official.attach_guidance_model "
                              "or `effigen convert rae-official --guidance-ckpt`), or sample with guidance=cfg")
        guide = self.guidance_model.to(x_t.device).eval()
        return autoguided_prediction(model, guide, x_t, t, labels, sampler.cfg_scale, sampler.cfg_interval,
                                     interval_time)

    def evaluations_per_sample(self, sampler: RAESamplerConfig, model: nn.Module | None = None) -> int:
        shape = None
        if model is not None and hasattr(model.config, "input_size"):
            shape = (model.config.in_channels, model.config.input_size, model.config.input_size)
        shift = sampler.time_shift if sampler.time_shift > 0 or shape is None else self.shift_for(shape)
        return super().evaluations_per_sample(sampler, shift or 1.0)



# --------------------------------------------------------------------------------------------------------- stage 1
@dataclass
class RAEDecoderLossConfig:
    """RAE's decoder loss (`src/train_stage1.py`): L1 + perceptual (LPIPS there; a built-in feature net's LPIPS-like
    distance here, objectives.autoencoder) + an adaptively weighted GAN term (paper: disc_weight 0.75 with a frozen
    DINO-S/8 discriminator backbone and DiffAugment; here effigen's PatchGAN, hinge loss)."""

    l1_weight: float = 1.0
    l2_weight: float = 0.0
    perceptual_weight: float = 1.0
    perceptual_net: str = "mnist-net"  # a built-in feature net or a feature-net .safetensors
    gan_weight: float = 0.0  # paper: 0.75
    gan_start_step: int = 0  # paper: epoch 8 of 16
    discriminator_channels: int = 64
    discriminator_layers: int = 2

    def __post_init__(self):
        for name in ("l1_weight", "l2_weight", "perceptual_weight", "gan_weight"):
            check_range(name, getattr(self, name), 0)
        if self.perceptual_weight > 0 and not self.perceptual_net.strip():
            raise ValueError("perceptual_weight > 0 needs perceptual_net (mnist-net, digits-net, shapes-net or a "
                             "feature-net .safetensors file), or perceptual_weight=0")


class RAEDecoderLoss(AutoencoderLoss):
    """Trains the RAE tokenizer's decoder (the encoder is frozen): the reconstruction of the noise-augmented latent
    z + sigma eps, sigma = noise_tau U(0, 1) per sample, eps and U from the trainer's per-sample streams."""

    config_class = RAEDecoderLossConfig

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], random: BatchRandom) -> dict[str, torch.Tensor]:
        images = batch["images"]
        network = unwrap(model)
        noise = random.randn(*network.latent_shape())  # (B, C, h, w)
        sigma = network.config.noise_tau * random.rand()  # (B,)
        reconstruction = model(images, noise.to(images.device), sigma.to(images.device)).float()
        logs: dict[str, torch.Tensor] = {}
        rec_loss = self.reconstruction_terms(images, reconstruction, logs)
        loss = rec_loss + self.adversarial_terms(model, images, reconstruction, rec_loss, random.key[1], logs)
        logs.update(noise_sigma=sigma.mean().detach(), loss=loss)
        return logs
