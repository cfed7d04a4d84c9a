"""RAE: a representation autoencoder (Zheng et al., "Diffusion Transformers with Representation Autoencoders",
arXiv 2510.11690; code bytetriper/RAE `src/stage1/rae.py`, `src/stage1/encoders/dinov2.py`): a FROZEN representation
encoder (any effigen teacher, `teachers/`: DINOv2-B with registers in the paper, the built-in `mnist-vit` on built-in
data) and a trained ViT decoder from its patch tokens back to pixels.

Encoder side, as the paper (its `Dinov2withNorm`): the teacher's last-block patch tokens (CLS and registers dropped)
go through the final LayerNorm WITHOUT its affine weights, then are laid out as a (C, h, w) latent (`reshape_to_2d`),
then normalised per element by the latent statistics (mean and variance of every (c, i, j), eps 1e-5, the paper's
`stat.pt`): z = (tokens - mean) / sqrt(var + eps). effigen measures those statistics on the training images at the
end of the decoder's run (`calibrate_latents`, as the KL-VAE does) and keeps them as buffers (`latent_mean`,
`latent_var`, (C, h, w)) in the tokenizer's weights. A teacher without a transformer (the `mnist-net` feature net)
gets an affine-free LayerNorm of its features instead.

Decoder: a ViT (MAE-decoder style: linear token embedding to its width, fixed 2-D sin-cos positions, pre-norm blocks
with GELU MLPs, final LayerNorm, a linear map to p x p x 3 pixels per token, p = resolution / grid). Trained by
`objectives/rae.py`'s `RAEDecoderLoss` with L1 + perceptual + GAN terms on a noise-augmented latent: during training
the decoder sees z + sigma eps with sigma = noise_tau * U(0, 1) per sample (paper: noise_tau 0.8), at inference the
clean latent. The noise is added to the un-normalised tokens, as the official `noising` does before normalisation.

The encoder is not part of the tokenizer's weights: it is rebuilt from `encoder` (a teacher spec such as
"mnist-vit" or "dinov2-vitb14-reg=PATH") on the first `encode`, so a pipeline that only samples (decodes) never needs
it. Its token count and width must match the decoder's (`grid`^2 tokens of `encoder_dim` channels); a mismatch is an
error naming the settings to change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.attention import SelfAttention
from ..nn.embeddings import sincos_2d_positions
from ..nn.layers import Mlp
from .base import LatentSpace, TokenizerOutput


@dataclass
class RAEConfig:
    encoder: str = "mnist-vit"  # a teacher spec (effigen.teachers.load_teacher): the frozen encoder
    encoder_dim: int = 128  # the encoder's token width = the latent's channels
    grid: int = 8  # the latent's side: the encoder runs at grid x grid patch tokens
    resolution: int = 32  # image side
    in_channels: int = 3  # image channels
    decoder_hidden_size: int = 192
    decoder_depth: int = 4
    decoder_num_heads: int = 4
    decoder_mlp_ratio: float = 4.0
    # the official stage-1 decoder's layout (a transformers ViT-MAE decoder): a trainable CLS token in front of the
    # tokens (its output dropped), exact GELU, LayerNorm eps 1e-12; effigen's own decoders: none, tanh GELU, 1e-6
    decoder_cls_token: bool = False
    decoder_gelu: Literal["tanh", "exact"] = "tanh"
    decoder_layer_norm_eps: float = 1e-6
    noise_tau: float = 0.8  # training noise augmentation: sigma ~ noise_tau * U(0, 1) per sample; 0 = off
    normalize_latents: bool = True  # the paper's per-element mean / variance normalisation of the latent
    stats_eps: float = 1e-5

    def __post_init__(self):
        if self.grid < 1 or self.resolution % self.grid:
            raise ValueError(f"resolution {self.resolution} is not a multiple of grid {self.grid}: the decoder maps "
                             "each latent token to a (resolution / grid)^2 pixel patch; pick a grid that divides it")
        if self.decoder_hidden_size % self.decoder_num_heads:
            raise ValueError(f"decoder_hidden_size {self.decoder_hidden_size} is not divisible by decoder_num_heads "
                             f"{self.decoder_num_heads}")
        if self.decoder_hidden_size % 4:
            raise ValueError("decoder_hidden_size must be a multiple of 4 (2-D sin-cos positions)")
        if not 0 <= self.noise_tau:
            raise ValueError(f"noise_tau must be >= 0 (0 = no noise augmentation), got {self.noise_tau}")

    @property
    def patch_size(self) -> int:
        return self.resolution // self.grid


# Sizes for `effigen train --method rae --network_preset=...`.
RAE_PRESETS: dict[str, dict] = {
    # the paper's stage 1 (DINOv2-B/14 with registers at 224 px -> 16 x 16 x 768; ViT-XL decoder: 28 x 1152, 16 heads,
    # MLP 4096) at 256 px; set --network.encoder=dinov2-vitb14-reg=PATH to the local weights
    "RAE-DINOv2-B-ViTXL": dict(encoder="dinov2-vitb14-reg", encoder_dim=768, grid=16, resolution=256,
                               decoder_hidden_size=1152, decoder_depth=28, decoder_num_heads=16,
                               decoder_mlp_ratio=4096 / 1152),
    # built-in data: the built-in mnist-vit teacher at 32 px -> 8 x 8 x 128 latents; a small ViT decoder
    "RAE-MNIST": dict(encoder="mnist-vit", encoder_dim=128, grid=8, resolution=32, decoder_hidden_size=192,
                      decoder_depth=4, decoder_num_heads=4),
    "RAE-Test": dict(encoder="mnist-vit", encoder_dim=128, grid=4, resolution=16, decoder_hidden_size=32,
                     decoder_depth=1, decoder_num_heads=2),
}


class DecoderBlock(nn.Module):
    """Pre-norm transformer block (LayerNorm, self-attention, LayerNorm, GELU MLP)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, gelu: str = "tanh", eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = SelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, round(dim * mlp_ratio))
        if gelu == "exact":
            self.mlp.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))  # (B, L, D)
        return x + self.mlp(self.norm2(x))  # (B, L, D)


class ViTDecoder(nn.Module):
    """(B, C, h, w) latent tokens -> (B, 3, H, W) pixels."""

    def __init__(self, config: RAEConfig):
        super().__init__()
        D, p = config.decoder_hidden_size, config.patch_size
        self.config = config
        self.embed = nn.Linear(config.encoder_dim, D)
        positions = torch.from_numpy(sincos_2d_positions(D, config.grid)).float()
        if config.decoder_cls_token:  # ViT-MAE: a zero position row for the CLS token
            self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
            positions = torch.cat([positions.new_zeros(1, D), positions])
        self.register_buffer("pos_embed", positions.unsqueeze(0), persistent=False)  # (1, [1 +] L, D), fixed
        eps = config.decoder_layer_norm_eps
        self.blocks = nn.ModuleList([DecoderBlock(D, config.decoder_num_heads, config.decoder_mlp_ratio,
                                                  config.decoder_gelu, eps) for _ in range(config.decoder_depth)])
        self.norm = nn.LayerNorm(D, eps=eps)
        self.head = nn.Linear(D, p * p * config.in_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # Transformer layers: Xavier-uniform weights, zero biases (MAE / DiT).
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def last_layer(self) -> torch.Tensor:  # the GAN's adaptive weight balances gradients here (objectives.autoencoder)
        return self.head.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        B, C, h, w = z.shape
        x = self.embed(z.flatten(2).transpose(1, 2))  # (B, L, D)
        if self.config.decoder_cls_token:
            x = torch.cat([self.cls_token.expand(B, -1, -1).to(x.dtype), x], dim=1)  # (B, 1 + L, D)
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)  # (B, [1 +] L, D)
        x = self.head(self.norm(x))  # (B, [1 +] L, p*p*3)
        x = x[:, 1:] if self.config.decoder_cls_token else x  # (B, L, p*p*3)
        p, channels = self.config.patch_size, self.config.in_channels
        x = x.reshape(B, h, w, p, p, channels)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(B, channels, h * p, w * p)  # (B, 3, H, W)


class RAE(TokenizerOutput, nn.Module):
    config_class = RAEConfig

    @classmethod
    def output_of(cls, config: RAEConfig) -> LatentSpace:
        return LatentSpace(config.encoder_dim, (config.grid, config.grid), config.resolution, config.in_channels,
                           config.patch_size, normalized=config.normalize_latents)

    def __init__(self, config: RAEConfig, encoder=None):
        """`encoder`: a teacher to use instead of loading `config.encoder` (tests, or a teacher already in memory)."""
        super().__init__()
        self.config = config
        self.decoder = ViTDecoder(config)
        shape = (config.encoder_dim, config.grid, config.grid)
        self.register_buffer("latent_mean", torch.zeros(shape))  # the paper's per-element statistics
        self.register_buffer("latent_var", torch.ones(shape))
        self._encoder = [encoder.frozen()] if encoder is not None else []  # a list: not a submodule, not saved

    # ---------------------------------------------------------------- encoder
    @property
    def encoder(self):
        """The frozen teacher, loaded on first use."""
        if not self._encoder:
            from ..teachers import load_teacher

            self._encoder.append(load_teacher(self.config.encoder).frozen())
        return self._encoder[0]

    @torch.no_grad()
    def encoder_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> the un-normalised latent (B, C, h, w): the encoder's last-block patch
        tokens after a LayerNorm without affine (module docstring)."""
        from ..teachers import ViTTeacher

        config, teacher = self.config, self.encoder.to(images.device)
        if images.shape[-1] != config.resolution or images.shape[-2] != config.resolution:
            raise ValueError(f"this RAE encodes {config.resolution} px images, got {tuple(images.shape[-2:])}; use "
                             f"data.resolution={config.resolution}")
        with torch.autocast(images.device.type, enabled=False):
            if isinstance(teacher, ViTTeacher):
                grid = teacher.grid_for(config.grid)
                tokens = teacher.model(teacher.preprocess(images.float(), grid))[:, teacher.model.num_prefix_tokens:]
                eps = teacher.model.norm.eps
            else:
                tokens, eps = teacher.features(images.float(), grid=config.grid), 1e-6
            tokens = F.layer_norm(tokens.float(), (tokens.shape[-1],), eps=eps)  # (B, N, C), no affine
        B, N, C = tokens.shape
        if N != config.grid ** 2 or C != config.encoder_dim:
            raise ValueError(
                f"the encoder {config.encoder!r} gives {N} tokens of width {C} for {config.resolution} px images, but "
                f"this RAE's decoder takes {config.grid}x{config.grid} = {config.grid ** 2} tokens of width "
                f"{config.encoder_dim}: set network.grid (the token grid side) and network.encoder_dim to the "
                "encoder's, or use an encoder whose token grid and width match")
        return tokens.transpose(1, 2).reshape(B, C, config.grid, config.grid)  # (B, C, h, w), row-major tokens

    # ---------------------------------------------------------------- latents
    def _statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.latent_mean, (self.latent_var + self.config.stats_eps).sqrt()

    def check_latents(self, latents: torch.Tensor) -> None:
        expected = self.output.shape
        if latents.ndim != 4 or tuple(latents.shape[1:]) != expected:
            raise ValueError(f"this RAE decodes latents (B, {', '.join(map(str, expected))}) ({self.config.grid}^2 "
                             f"tokens of width {self.config.encoder_dim}), got {tuple(latents.shape)}: the generator "
                             "or cache was made with another encoder or grid")

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None, sample: bool = False) -> torch.Tensor:
        """Normalised latents (B, C, h, w) of images in [-1, 1] (deterministic: `generator`/`sample` are ignored)."""
        z = self.encoder_tokens(images)
        if not self.config.normalize_latents:
            return z
        mean, std = self._statistics()
        return (z - mean) / std

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        self.check_latents(latents)
        z = latents
        if self.config.normalize_latents:
            mean, std = self._statistics()
            z = latents * std.to(latents.dtype) + mean.to(latents.dtype)
        return self.decode_raw(z).clamp(-1, 1)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(images))

    def forward(self, images: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Training pass: decode the noise-augmented latent z + sigma * noise (z the un-normalised encoder latent,
        no gradient; noise (B, C, h, w), sigma (B,) = noise_tau * U(0, 1))."""
        z = self.encoder_tokens(images)
        z = z + sigma.to(z.dtype).view(-1, 1, 1, 1) * noise.to(z.dtype)
        return self.decode_raw(z)

    def latent_shape(self, resolution: int | None = None) -> tuple[int, int, int]:
        return self.output.shape

    @torch.no_grad()
    def calibrate_latents(self, batches) -> dict[str, list[float]]:
        """Measure the per-element mean and variance of the un-normalised latents over `batches` of images (an
        iterable of (B, 3, H, W) tensors) into `latent_mean` / `latent_var`; afterwards `encode` gives the paper's
        normalised latents. Returns per-channel summaries (channel_mean, channel_std over all elements)."""
        device = self.latent_mean.device
        total = total_sq = None
        count = 0
        for images in batches:
            z = self.encoder_tokens(images.to(device).float()).double()
            total = z.sum(0) if total is None else total + z.sum(0)
            total_sq = z.square().sum(0) if total_sq is None else total_sq + z.square().sum(0)
            count += z.shape[0]
        if count == 0:
            raise ValueError("calibrate_latents needs at least one batch of images")
        mean = total / count
        var = (total_sq / count - mean.square()).clamp_min(0)
        self.latent_mean.copy_(mean.float())
        self.latent_var.copy_(var.float())
        channel_std = (var.mean(dim=(1, 2)) + mean.var(dim=(1, 2), unbiased=False)).sqrt()
        return {"channel_mean": mean.mean(dim=(1, 2)).tolist(), "channel_std": channel_std.tolist()}
