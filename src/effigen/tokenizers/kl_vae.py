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


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32 if channels % 32 == 0 else min(channels, 8), channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H x W positions, with 1x1-conv projections (LDM names)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (layer(h).flatten(2).transpose(1, 2).unsqueeze(1) for layer in (self.q, self.k, self.v))  # (B, 1, HW, C)
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # LDM's asymmetric padding


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(blocks: list[nn.Module], attentions: list[nn.Module], resample: nn.Module | None) -> nn.Module:
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    level.attn = nn.ModuleList(attentions)
    if resample is not None:
        setattr(level, "downsample" if isinstance(resample, Downsample) else "upsample", resample)
    return level


def _middle(channels: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = ResnetBlock(channels, channels), AttnBlock(channels), ResnetBlock(channels, channels)
    return mid


class Encoder(nn.Module):
    def __init__(self, config: KLVAEConfig):
        super().__init__()
        ch, mult = config.base_channels, config.channel_multipliers
        self.conv_in = nn.Conv2d(config.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        size, block_in = config.resolution, ch
        for i, m in enumerate(mult):
            blocks, attentions = [], []
            for _ in range(config.num_res_blocks):
                blocks.append(ResnetBlock(block_in, ch * m))
                block_in = ch * m
                if size in config.attention_resolutions:
                    attentions.append(AttnBlock(block_in))
            last = i == len(mult) - 1
            self.down.append(_level(blocks, attentions, None if last else Downsample(block_in)))
            size = size if last else size // 2
        self.mid = _middle(block_in)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 2 z, h, w): mean and log-variance


class Decoder(nn.Module):
    def __init__(self, config: KLVAEConfig):
        super().__init__()
        ch, mult = config.base_channels, config.channel_multipliers
        block_in = ch * mult[-1]
        size = config.resolution // config.downsample_factor
        self.conv_in = nn.Conv2d(config.latent_channels, block_in, 3, padding=1)
        self.mid = _middle(block_in)
        levels = []
        for i in reversed(range(len(mult))):
            blocks, attentions = [], []
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, ch * mult[i]))
                block_in = ch * mult[i]
                if size in config.attention_resolutions:
                    attentions.append(AttnBlock(block_in))
            levels.insert(0, _level(blocks, attentions, Upsample(block_in) if i != 0 else None))
            size = size * 2 if i != 0 else size
        self.up = nn.ModuleList(levels)  # indexed by level, as LDM's `self.up.insert(0, up)`
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(self.up):
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class KLVAE(nn.Module):
    config_class = KLVAEConfig

    def __init__(self, config: KLVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
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
