"""KL autoencoder with the Stable-Diffusion VAE architecture (Rombach et al. arXiv 2112.10752, `AutoencoderKL`
of the CompVis/LDM code): a convolutional encoder to a diagonal Gaussian posterior, a decoder, and
`quant_conv` / `post_quant_conv` 1x1 convolutions around the latent.

Parameter names follow the LDM layout (`encoder.down.0.block.0.conv1`, `encoder.mid.attn_1.q`,
`decoder.up.3.upsample.conv`, ...), the layout of the released SD-VAE `.ckpt`/`.safetensors` files, so a local
copy of those weights loads with `load_state_dict_strict`. (The diffusers folder layout renames these keys;
mapping it is not done yet.)

Contract (DESIGN.md): `encode(images) -> latents` already multiplied by `scaling_factor` (0.18215 for SD-VAE)
after subtracting `shift_factor`; `decode(latents) -> images` in [-1, 1]. Training uses `posterior(images)`:
the loss is L1 reconstruction + `kl_weight` * KL(q(z|x) || N(0, I)) (`KLVAELoss`); the perceptual and GAN terms
of the paper are not implemented yet.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..rng import BatchRandom
from .autoencoder import ConvAutoencoderSpec, Decoder, Encoder


@dataclass
class KLVAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 128  # LDM `ch`
    channel_multipliers: tuple[int, ...] = (1, 2, 4, 4)  # SD-VAE: f8
    num_res_blocks: int = 2
    latent_channels: int = 4  # z_channels = embed_dim for SD-VAE
    attention_resolutions: tuple[int, ...] = ()  # feature-map sizes with attention besides the middle block
    resolution: int = 256
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_multipliers) - 1)


class KLVAE(nn.Module):
    config_class = KLVAEConfig

    def __init__(self, config: KLVAEConfig):
        super().__init__()
        self.config = config
        spec = ConvAutoencoderSpec(
            in_channels=config.in_channels, out_channels=config.out_channels, base_channels=config.base_channels,
            channel_multipliers=tuple(config.channel_multipliers), num_res_blocks=config.num_res_blocks,
            encoder_out_channels=2 * config.latent_channels, decoder_in_channels=config.latent_channels,
            attention_resolutions=tuple(config.attention_resolutions), resolution=config.resolution,
        )
        self.encoder = Encoder(spec)
        self.decoder = Decoder(spec)
        z = config.latent_channels
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1)
        self.post_quant_conv = nn.Conv2d(z, z, 1)

    def posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) in [-1, 1] -> mean and log-variance of q(z | x), each (B, z, H/f, W/f)."""
        if images.shape[-1] % self.config.downsample_factor or images.shape[-2] % self.config.downsample_factor:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not a multiple of the VAE's downsampling "
                             f"factor {self.config.downsample_factor}")
        mean, logvar = self.quant_conv(self.encoder(images)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None, sample: bool = False) -> torch.Tensor:
        """Scaled latents: (z - shift) * scale, with z the posterior mean (or a sample)."""
        mean, logvar = self.posterior(images)
        z = mean
        if sample:
            z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator).to(mean.device)
        return (z - self.config.shift_factor) * self.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents / self.config.scaling_factor + self.config.shift_factor
        return self.decode_raw(z).clamp(-1, 1)


@dataclass
class KLVAELossConfig:
    kl_weight: float = 1e-6  # LDM's SD-VAE / VA-VAE setting


class KLVAELoss:
    """L1 reconstruction + kl_weight * KL(q(z|x) || N(0, I)) (summed over latent dims, averaged over the batch,
    as LDM; the reconstruction is a per-pixel mean)."""

    config_class = KLVAELossConfig

    def __init__(self, config: KLVAELossConfig):
        self.config = config

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], random: BatchRandom) -> dict[str, torch.Tensor]:
        images = batch["images"]
        vae = model.module if hasattr(model, "module") else model
        mean, logvar = vae.posterior(images)
        z = mean + torch.exp(0.5 * logvar) * random.randn(*mean.shape[1:]).to(mean.dtype)
        reconstruction = vae.decode_raw(z).float()
        l1 = (reconstruction - images).abs().mean()
        kl = 0.5 * (mean.float() ** 2 + logvar.float().exp() - 1 - logvar.float()).sum(dim=(1, 2, 3)).mean()
        return {"loss": l1 + self.config.kl_weight * kl, "l1": l1.detach(), "kl": kl.detach()}
