"""KL autoencoder with the Stable-Diffusion VAE architecture (Rombach et al. arXiv 2112.10752, `AutoencoderKL`
of the CompVis/LDM code): a convolutional encoder to a diagonal Gaussian posterior, a decoder, and
`quant_conv` / `post_quant_conv` 1x1 convolutions around the latent. The same class holds LightningDiT's VA-VAE
(f16, 32 channels; preset `VA-VAE`) and the small VAEs trained here on built-in data (`KL-S/4`).

Parameter names follow the LDM layout (`encoder.down.0.block.0.conv1`, `encoder.mid.attn_1.q`,
`decoder.up.3.upsample.conv`, ...), the layout of the released SD-VAE `.ckpt`/`.safetensors` files and of the
VA-VAE checkpoint; the diffusers folder layout (`encoder.down_blocks.0.resnets.0.conv1`, ...) is translated by
`effigen.convert.sd_vae` (`effigen convert sd-vae`).

Contract (DESIGN.md): `encode(images) -> latents`, normalised: ((z - shift) / std) * scaling_factor, with z the
posterior mean, `shift`/`std` either the scalars `shift_factor` / 1 (SD-VAE: 0, 0.18215) or per-channel
statistics `channel_mean` / `channel_std` (LightningDiT's latent_stats, multiplier 1); `decode(latents)` inverts
that and returns images in [-1, 1]. A VAE trained by effigen measures its per-channel statistics on its training
data at the end of the run (`calibrate_latents`), so generators train on unit-variance latents.
Training: `forward(images, noise)` (see `objectives.kl_vae`): L1 + KL, optional perceptual and GAN terms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .autoencoder import ConvAutoencoderSpec, Decoder, Encoder
from .base import LatentSpace, TokenizerOutput


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
    channel_mean: tuple[float, ...] = ()  # per-channel latent statistics (LightningDiT's latent_stats); empty = scalars
    channel_std: tuple[float, ...] = ()

    def __post_init__(self):
        if len(self.channel_mean) != len(self.channel_std) or (self.channel_mean and len(self.channel_mean) != self.latent_channels):
            raise ValueError(f"channel_mean and channel_std need one value per latent channel ({self.latent_channels}), "
                             f"got {len(self.channel_mean)} and {len(self.channel_std)}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_multipliers) - 1)


class KLVAE(TokenizerOutput, nn.Module):
    config_class = KLVAEConfig

    @classmethod
    def output_of(cls, config: KLVAEConfig) -> LatentSpace:
        side = config.resolution // config.downsample_factor
        return LatentSpace(config.latent_channels, (side, side), config.resolution, config.in_channels,
                           config.downsample_factor)

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

    def forward(self, images: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: (reconstruction of z = mean + std * noise (unclamped), mean, log-variance)."""
        mean, logvar = self.posterior(images)
        z = mean + torch.exp(0.5 * logvar) * noise.to(mean.dtype)
        return self.decode_raw(z), mean, logvar

    def latent_shape(self, resolution: int | None = None) -> tuple[int, int, int]:
        side = (resolution or self.config.resolution) // self.config.downsample_factor
        return (self.config.latent_channels, side, side)

    def _normalisation(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        config = self.config
        if config.channel_mean:
            shift = torch.tensor(config.channel_mean, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
            std = torch.tensor(config.channel_std, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
        else:
            shift, std = like.new_tensor(config.shift_factor), like.new_tensor(1.0)
        return shift, std / config.scaling_factor

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None, sample: bool = False) -> torch.Tensor:
        """Normalised latents of images in [-1, 1]: the posterior mean (or a sample from q(z | x))."""
        mean, logvar = self.posterior(images)
        z = mean
        if sample:
            z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator).to(mean.device)
        shift, scale = self._normalisation(z)
        return (z - shift) / scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        shift, scale = self._normalisation(latents)
        return self.decode_raw(latents * scale + shift).clamp(-1, 1)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(images))

    @torch.no_grad()
    def calibrate_latents(self, batches) -> dict[str, list[float]]:
        """Measure per-channel mean and std of the posterior means over `batches` of images (an iterable of
        (B, 3, H, W) tensors) and store them in the config (scaling_factor 1, shift 0): afterwards `encode` gives
        zero-mean unit-variance latents per channel, as LightningDiT normalises VA-VAE latents."""
        total, total_sq, count = 0.0, 0.0, 0
        for images in batches:
            mean, _ = self.posterior(images.to(next(self.parameters()).device).float())
            mean = mean.double()
            total = total + mean.sum(dim=(0, 2, 3))
            total_sq = total_sq + mean.square().sum(dim=(0, 2, 3))
            count += mean.shape[0] * mean.shape[2] * mean.shape[3]
        if count == 0:
            raise ValueError("calibrate_latents needs at least one batch of images")
        channel_mean = total / count
        channel_std = (total_sq / count - channel_mean.square()).clamp_min(1e-12).sqrt()
        self.config.channel_mean = tuple(float(x) for x in channel_mean)
        self.config.channel_std = tuple(float(x) for x in channel_std)
        self.config.scaling_factor, self.config.shift_factor = 1.0, 0.0
        return {"channel_mean": list(self.config.channel_mean), "channel_std": list(self.config.channel_std)}
