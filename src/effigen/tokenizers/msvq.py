"""VAR's multi-scale residual VQ-VAE (Tian et al., "Visual Autoregressive Modeling", arXiv 2404.02905).

An image is encoded to a feature map f (B, C, h, w) and quantized into K token maps r_1..r_K of growing
side lengths `scales` (e.g. 1, 2, 3, 4, 5, 6, 8, 10, 13, 16), all with one shared codebook:

    f_rest = f,  f_hat = 0
    for k = 1..K:  r_k = nearest code of area-downsample(f_rest, s_k)
                   h_k = phi_k(bicubic-upsample(embed(r_k), h))   (no upsampling at the last scale)
                   f_hat += h_k,  f_rest -= h_k

phi_k is a 3x3 conv mixed with the identity, (1 - q) x + q conv(x) with q = `quant_resi` (0.5); `share_quant_resi`
convs are shared across the K scales (4 in the release; scale k uses the conv whose tick in
linspace(1/12, 11/12, 4) is nearest to k/(K-1)). The decoder reconstructs the image from f_hat.

What the code follows: the architecture, parameter names and buffers of the official `VQVAE` (models/vqvae.py,
models/quant.py), so `vae_ch160v4096z32.pth` and other folders load with the converter and the token indices
match the official code exactly (tests/parity). The VQ loss is the official per-scale
beta * ||sg(f_hat) - f||^2 + ||f_hat - sg(f)||^2 averaged over scales, with a straight-through estimator.

What effigen adds (the official training code was never released; users report coarse-scale collapse):
per-scale codebook-usage tracking in the `ema_vocab_hit_SV` buffer in every training run (not only
distributed ones), and dead-code restarts (`restart_dead_codes`) that move codes unused for a while onto
residual vectors the encoder actually produces at any scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .autoencoder import ConvAutoencoderSpec, Decoder, Encoder
from .base import TokenizerOutput, TokenSpace

# VAR's released schedules, by image resolution (the 16x-downsampling tokenizer).
VAR_SCALES = {
    256: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    512: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
    1024: (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64),
}


@dataclass
class MultiScaleVQConfig:
    in_channels: int = 3
    base_channels: int = 160  # VAR `ch`
    channel_multipliers: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    latent_channels: int = 32  # `Cvae` / `z_channels`
    vocab_size: int = 4096
    scales: tuple[int, ...] = VAR_SCALES[256]  # `v_patch_nums`, coarse to fine; the last = latent side
    resolution: int = 256
    attention: bool = True  # `using_sa`: attention after each block of the lowest level
    mid_attention: bool = True  # `using_mid_sa`
    quant_conv_kernel: int = 3
    quant_resi: float = 0.5
    share_quant_resi: int = 4  # 0: one phi per scale, 1: one phi for all, n: n phis shared by nearest tick
    phi_count: int = 0  # with share_quant_resi=0: number of phis (0 = one per scale; `default_qresi_counts`)
    beta: float = 0.25  # commitment weight
    using_znorm: bool = False  # cosine-similarity lookup instead of L2
    dropout: float = 0.0
    usage_decay: float = 0.99  # EMA of per-scale code hits

    def __post_init__(self):
        self.channel_multipliers = tuple(self.channel_multipliers)
        self.scales = tuple(int(s) for s in self.scales)
        factor = 2 ** (len(self.channel_multipliers) - 1)
        if self.resolution % factor:
            raise ValueError(f"resolution {self.resolution} is not a multiple of the downsampling factor {factor} "
                             f"(2^(len(channel_multipliers)-1)); change tokenizer resolution or channel_multipliers")
        side = self.resolution // factor
        if not self.scales or self.scales[-1] != side:
            raise ValueError(f"scales {self.scales} must end at the latent side {side} (resolution {self.resolution} / "
                             f"downsampling {factor}); e.g. scales=(1, 2, 3, {side})")
        if list(self.scales) != sorted(set(self.scales)):
            raise ValueError(f"scales {self.scales} must be strictly increasing")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_multipliers) - 1)

    @property
    def num_tokens(self) -> int:
        return sum(s * s for s in self.scales)


class Phi(nn.Conv2d):
    """phi(h) = (1 - ratio) h + ratio conv3x3(h)."""

    def __init__(self, channels: int, ratio: float):
        super().__init__(channels, channels, 3, padding=1)
        self.ratio = abs(ratio)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * (1 - self.ratio) + super().forward(h) * self.ratio


def _ticks(count: int) -> np.ndarray:
    return np.linspace(1 / 3 / count, 1 - 1 / 3 / count, count) if count == 4 else np.linspace(1 / 2 / count, 1 - 1 / 2 / count, count)


class PhiShared(nn.Module):
    def __init__(self, phi: nn.Module):
        super().__init__()
        self.qresi = phi

    def __getitem__(self, at: float) -> nn.Module:
        return self.qresi


class PhiPartiallyShared(nn.Module):
    def __init__(self, phis: list[nn.Module]):
        super().__init__()
        self.qresi_ls = nn.ModuleList(phis)
        self.ticks = _ticks(len(phis))

    def __getitem__(self, at: float) -> nn.Module:
        return self.qresi_ls[int(np.argmin(np.abs(self.ticks - at)))]


class PhiNonShared(nn.ModuleList):
    def __init__(self, phis: list[nn.Module]):
        super().__init__(phis)
        self.ticks = _ticks(len(phis))

    def __getitem__(self, at: float) -> nn.Module:  # type: ignore[override]
        return super().__getitem__(int(np.argmin(np.abs(self.ticks - at))))


class MultiScaleQuantizer(nn.Module):
    """Residual quantization over the scale schedule (official name: `VectorQuantizer2`, key prefix `quantize`)."""

    def __init__(self, config: MultiScaleVQConfig):
        super().__init__()
        self.config = config
        C, ratio = config.latent_channels, config.quant_resi

        def make_phi() -> nn.Module:
            return Phi(C, ratio) if abs(ratio) > 1e-6 else nn.Identity()

        if config.share_quant_resi == 0:
            self.quant_resi = PhiNonShared([make_phi() for _ in range(config.phi_count or len(config.scales))])
        elif config.share_quant_resi == 1:
            self.quant_resi = PhiShared(make_phi())
        else:
            self.quant_resi = PhiPartiallyShared([make_phi() for _ in range(config.share_quant_resi)])
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(config.scales), config.vocab_size))
        self.embedding = nn.Embedding(config.vocab_size, C)
        self.restart_pool: torch.Tensor | None = None  # residual vectors of the last training batch

    # ------------------------------------------------------------------ helpers
    @property
    def scales(self) -> tuple[int, ...]:
        return self.config.scales

    def phi(self, si: int) -> nn.Module:
        count = len(self.scales)
        return self.quant_resi[si / (count - 1) if count > 1 else 1.0]

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Indices of the nearest codes of z (N, C), computed as the official code does."""
        codebook = self.embedding.weight.detach().float()
        z = z.float()
        if self.config.using_znorm:
            return torch.argmax(F.normalize(z, dim=-1) @ F.normalize(codebook.T, dim=0), dim=1)
        distance = torch.sum(z.square(), dim=1, keepdim=True) + torch.sum(codebook.square(), dim=1)
        distance.addmm_(z, codebook.T, alpha=-2, beta=1)
        return torch.argmin(distance, dim=1)

    def embed(self, indices: torch.Tensor, side: int) -> torch.Tensor:
        """(B, side*side) indices -> (B, C, side, side) code vectors."""
        B = indices.shape[0]
        return self.embedding(indices).transpose(1, 2).reshape(B, self.config.latent_channels, side, side)

    def upsample_residual(self, si: int, h: torch.Tensor) -> torch.Tensor:
        """phi_si(bicubic-upsample(h)) at the full latent size (no resize at the last scale)."""
        side = self.scales[-1]
        if si != len(self.scales) - 1:
            h = F.interpolate(h, size=(side, side), mode="bicubic")
        return self.phi(si)(h)

    # ------------------------------------------------------------------ quantization
    def quantize(self, f: torch.Tensor, return_latents: bool = False) -> list[torch.Tensor]:
        """f (B, C, h, w) -> token indices per scale [(B, s_k^2)] (or the cumulative f_hat after each scale)."""
        B, C, H, W = f.shape
        if (H, W) != (self.scales[-1],) * 2:
            raise ValueError(f"feature map {H}x{W} does not match the last scale {self.scales[-1]}")
        f_rest = f.detach().float().clone()
        f_hat = torch.zeros_like(f_rest)
        out = []
        for si, side in enumerate(self.scales):
            rest = F.interpolate(f_rest, size=(side, side), mode="area") if si != len(self.scales) - 1 else f_rest
            indices = self.nearest(rest.permute(0, 2, 3, 1).reshape(-1, C))
            h = self.upsample_residual(si, self.embed(indices.view(B, -1), side))
            f_hat = f_hat + h
            f_rest = f_rest - h
            out.append(f_hat.clone() if return_latents else indices.view(B, side * side))
        return out

    def latent_from_indices(self, indices: list[torch.Tensor]) -> torch.Tensor:
        """Token maps (coarse to fine) -> f_hat (B, C, h, w)."""
        f_hat = None
        for si, (side, idx) in enumerate(zip(self.scales, indices)):
            h = self.upsample_residual(si, self.embed(idx, side))
            f_hat = h if f_hat is None else f_hat + h
        return f_hat

    def teacher_forcing_input(self, indices: list[torch.Tensor]) -> torch.Tensor:
        """The transformer's inputs for scales 2..K: f_hat after scales 1..k area-downsampled to scale k+1,
        flattened and concatenated, (B, L - s_1^2, C) float32 (official `idxBl_to_var_input`)."""
        B = indices[0].shape[0]
        side = self.scales[-1]
        f_hat = torch.zeros(B, self.config.latent_channels, side, side, device=indices[0].device)
        inputs = []
        for si in range(len(self.scales) - 1):
            f_hat = f_hat + self.upsample_residual(si, self.embed(indices[si], self.scales[si])).float()
            nxt = self.scales[si + 1]
            inputs.append(F.interpolate(f_hat, size=(nxt, nxt), mode="area").flatten(2).transpose(1, 2))
        if not inputs:
            return torch.zeros(B, 0, self.config.latent_channels, device=indices[0].device)
        return torch.cat(inputs, dim=1)

    def scale_features(self, si: int, h: torch.Tensor) -> torch.Tensor:
        """Scale si's own code map h (B, C, s, s) as the HMAR mask branch sees it: phi_si(upsample(h)) area-downsampled
        back to s x s, flattened to (B, s^2, C) (official `get_next_mask_input`'s second output)."""
        side = self.scales[si]
        h = F.interpolate(self.upsample_residual(si, h.float()), size=(side, side), mode="area")
        return h.flatten(2).transpose(1, 2)

    def current_scale_inputs(self, indices: list[torch.Tensor]) -> torch.Tensor:
        """`scale_features` of every scale after the first, concatenated, (B, L - s_1^2, C) float32: the HMAR mask
        branch's teacher-forced input beside `teacher_forcing_input` (official `idxBl_to_mask_input`)."""
        B = indices[0].shape[0]
        inputs = [self.scale_features(si, self.embed(indices[si], side)) for si, side in enumerate(self.scales) if si > 0]
        if not inputs:
            return torch.zeros(B, 0, self.config.latent_channels, device=indices[0].device)
        return torch.cat(inputs, dim=1)

    def next_input(self, si: int, f_hat: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Sampling step: add scale si's code map h (B, C, s, s) to f_hat; return it and the next scale's input
        (area-downsampled f_hat, flattened to (B, s_next^2, C)), or None after the last scale."""
        f_hat = f_hat + self.upsample_residual(si, h)
        if si == len(self.scales) - 1:
            return f_hat, None
        nxt = self.scales[si + 1]
        return f_hat, F.interpolate(f_hat, size=(nxt, nxt), mode="area").flatten(2).transpose(1, 2)

    # ------------------------------------------------------------------ training
    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: (straight-through f_hat, VQ loss, hits (S, V) of this batch, all processes)."""
        f = f.float()
        B, C, H, W = f.shape
        f_no_grad = f.detach()
        f_rest = f_no_grad.clone()
        f_hat = torch.zeros_like(f_rest)
        loss = f.new_zeros(())
        hits = f.new_zeros(len(self.scales), self.config.vocab_size)
        pool = []
        for si, side in enumerate(self.scales):
            rest = F.interpolate(f_rest, size=(side, side), mode="area") if si != len(self.scales) - 1 else f_rest
            rest = rest.permute(0, 2, 3, 1).reshape(-1, C)
            # restart pool: the same number of residual vectors from every scale (up to 4 fixed positions of each
            # sample), so that revived codes also land where the coarse scales' residuals are; the positions do not
            # depend on the batch split, so the pool gathered over processes equals the one-process pool
            positions = torch.linspace(0, side * side - 1, min(4, side * side), device=rest.device).long()
            pool.append(rest.view(B, side * side, C)[:, positions].reshape(-1, C))
            indices = self.nearest(rest)
            hits[si] = indices.bincount(minlength=self.config.vocab_size).float()
            h = self.upsample_residual(si, self.embed(indices.view(B, -1), side))
            f_hat = f_hat + h
            f_rest = f_rest - h.detach()
            loss = loss + F.mse_loss(f_hat.detach(), f) * self.config.beta + F.mse_loss(f_hat, f_no_grad)
        loss = loss / len(self.scales)
        if self.training:  # usage statistics and the restart pool are training state (as the official `if self.training`)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(hits)
            with torch.no_grad():
                ema = self.ema_vocab_hit_SV
                if ema.sum() == 0:
                    ema.copy_(hits)
                else:
                    ema.mul_(self.config.usage_decay).add_(hits, alpha=1 - self.config.usage_decay)
            self.restart_pool = torch.cat(pool).detach()
        return (f_hat.detach() - f_no_grad) + f, loss, hits

    def usage(self, batch_tokens_per_scale: list[float] | None = None) -> list[float]:
        """Per-scale % of codes whose hit EMA exceeds 8% of a uniform share (the official margin)."""
        out = []
        for si, side in enumerate(self.scales):
            total = float(self.ema_vocab_hit_SV[si].sum())
            margin = total / self.config.vocab_size * 0.08
            out.append(100.0 * float((self.ema_vocab_hit_SV[si] > margin).float().mean()) if total > 0 else 0.0)
        return out

    @torch.no_grad()
    def restart_dead_codes(self, threshold: float, generator: torch.Generator) -> int:
        """Move codes whose hit EMA summed over scales is below `threshold` onto random residual vectors of the
        last training batch (4 fixed positions per sample and scale) (gathered over processes so every replica makes the same change). Returns how many."""
        if self.restart_pool is None:
            return 0
        dead = (self.ema_vocab_hit_SV.sum(0) < threshold).nonzero().flatten()
        if dead.numel() == 0:
            return 0
        pool = self.restart_pool
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [torch.empty_like(pool) for _ in range(torch.distributed.get_world_size())]
            torch.distributed.all_gather(gathered, pool)
            pool = torch.cat(gathered)
        choice = torch.randint(pool.shape[0], (dead.numel(),), generator=generator).to(pool.device)
        self.embedding.weight[dead] = pool[choice].to(self.embedding.weight.dtype)
        # give revived codes an average usage so they are not restarted again before they can be used
        self.ema_vocab_hit_SV[:, dead] = self.ema_vocab_hit_SV.mean(dim=1, keepdim=True)
        return int(dead.numel())



def attach_vq_autoencoder(module: nn.Module, config, quantizer_class: type) -> None:
    """Give a VQ tokenizer `module` the parts VAR's VQ-VAE layout names (encoder, decoder, quantize, quant_conv,
    post_quant_conv) from `config`'s autoencoder settings, built in that order (the same initialisation for a seed);
    the multi-scale and the residual VQ differ only in `quantizer_class`."""
    C = config.latent_channels
    spec = ConvAutoencoderSpec(
        in_channels=config.in_channels, out_channels=config.in_channels, base_channels=config.base_channels,
        channel_multipliers=config.channel_multipliers, num_res_blocks=config.num_res_blocks,
        encoder_out_channels=C, decoder_in_channels=C, attention_at_lowest=config.attention,
        mid_attention=config.mid_attention, fused_qkv=True, resolution=config.resolution, dropout=config.dropout,
    )
    module.encoder = Encoder(spec)
    module.decoder = Decoder(spec)
    module.quantize = quantizer_class(config)
    k = config.quant_conv_kernel
    module.quant_conv = nn.Conv2d(C, C, k, padding=k // 2)
    module.post_quant_conv = nn.Conv2d(C, C, k, padding=k // 2)

class MultiScaleVQ(TokenizerOutput, nn.Module):
    """Encoder -> quant_conv -> multi-scale residual quantizer -> post_quant_conv -> decoder.

    Tokenizer contract: `encode(images) -> f_hat` (the quantized latent), `decode(f_hat) -> images` in [-1, 1];
    token access with `indices_from_images` / `latent_from_indices`. Images are (B, 3, H, W) in [-1, 1].
    """

    config_class = MultiScaleVQConfig

    @classmethod
    def output_of(cls, config: MultiScaleVQConfig) -> TokenSpace:
        return TokenSpace(config.vocab_size, "multiscale", config.resolution, scales=tuple(config.scales),
                          embed_dim=config.latent_channels, image_channels=config.in_channels)

    def __init__(self, config: MultiScaleVQConfig):
        super().__init__()
        self.config = config
        attach_vq_autoencoder(self, config, MultiScaleQuantizer)

    @property
    def scales(self) -> tuple[int, ...]:
        return self.config.scales

    def _check(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != self.config.in_channels or tuple(images.shape[-2:]) != (self.config.resolution,) * 2:
            raise ValueError(f"expected images (B, {self.config.in_channels}, {self.config.resolution}, "
                             f"{self.config.resolution}) in [-1, 1], got {tuple(images.shape)}")

    def features(self, images: torch.Tensor) -> torch.Tensor:
        self._check(images)
        return self.quant_conv(self.encoder(images))

    @torch.no_grad()
    def indices_from_images(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Token indices per scale, coarse to fine: [(B, s_k^2) int64]."""
        return self.quantize.quantize(self.features(images))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """f_hat (B, C, h, w) -> images (B, 3, H, W) clamped to [-1, 1] (inference runs the decoder channels-last:
        `autoencoder.Decoder.forward`)."""
        return self.decoder(self.post_quant_conv(latents)).clamp(-1, 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.quantize.quantize(self.features(images), return_latents=True)[-1]

    def latent_from_indices(self, indices: list[torch.Tensor]) -> torch.Tensor:
        return self.quantize.latent_from_indices(indices)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(images))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: (reconstruction (unclamped), VQ loss, per-scale hits of the batch)."""
        f_hat, vq_loss, hits = self.quantize(self.features(images))
        return self.decoder(self.post_quant_conv(f_hat)), vq_loss, hits
