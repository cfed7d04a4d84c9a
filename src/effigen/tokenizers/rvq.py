"""Residual-VQ tokenizer (RQ-VAE, Lee et al., arXiv 2203.01941) of configurable depth, the tokenizer of ResGen
(Kim et al., "Efficient Generative Modeling with Residual Vector Quantization-Based Tokens", arXiv 2412.10208).

An image is encoded to a feature map f (B, C, h, w); every position i of the h x w grid gets `depth` codes
x_{i,1..D}, coarse to fine, by greedy residual quantization at full resolution:

    r_0 = f_i,   x_{i,j} = argmin_v ||r_{j-1} - e_j(v)||^2,   r_j = r_{j-1} - e_j(x_{i,j}),   f_hat_i = sum_j e_j(x_{i,j})

with one codebook per depth (`shared_codebook=False`, our default) or one shared by all depths (RQ-VAE's choice,
`shared_codebook=True`). A prefix of depths 1..d decodes to a coarser approximation of the same latent, which is
what ResGen's fine-to-coarse masking relies on. The decoder reconstructs the image from f_hat.

Training (`forward`) returns the same triple as VAR's multi-scale VQ (`tokenizers.msvq`), so one objective
(`objectives.vq_tokenizer.VQTokenizerLoss`: reconstruction + perceptual + VQ loss + dead-code restarts) trains both:
the VQ loss is beta ||sg(f_hat_j) - f||^2 + ||f_hat_j - sg(f)||^2 of the partial sums f_hat_j, averaged over depths
(RQ-VAE's commitment over partial sums; codebooks learned by gradient, not EMA: our choice), straight-through.
Per-depth code usage is tracked in `ema_vocab_hit_SV` (D, V) and dead codes restart on residuals of their own depth.

`requantize(z, start)` is the routine ResGen's sampler needs: greedy residual quantization of a predicted sum
z of the depths start..D-1 against those depths' codebooks only (`start` per row). Token layout everywhere:
indices (B, L, D) with L = h*w positions in raster order.

What ResGen does not publish (no code): the tokenizer's grid, depth per image size (8 and 16 are named), codebook
size and sharing. The presets here are ours, sized for built-in MNIST.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import TokenizerOutput, TokenSpace
from .msvq import attach_vq_autoencoder


@dataclass
class ResidualVQConfig:
    in_channels: int = 3
    base_channels: int = 32
    channel_multipliers: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    latent_channels: int = 16
    vocab_size: int = 256  # codes per depth's codebook
    depth: int = 4  # codes per position (RVQ depth D)
    shared_codebook: bool = False  # True: one codebook for all depths (RQ-VAE)
    resolution: int = 32
    attention: bool = True  # attention after each block of the lowest level
    mid_attention: bool = True
    quant_conv_kernel: int = 3
    beta: float = 0.25  # commitment weight
    dropout: float = 0.0
    usage_decay: float = 0.99  # EMA of per-depth code hits

    def __post_init__(self):
        self.channel_multipliers = tuple(self.channel_multipliers)
        if self.depth < 1:
            raise ValueError(f"depth={self.depth}: a residual VQ needs at least one code per position (depth >= 1)")
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size={self.vocab_size} must be at least 2")
        factor = self.downsample_factor
        if self.resolution % factor:
            raise ValueError(f"resolution {self.resolution} is not a multiple of the downsampling factor {factor} "
                             f"(2^(len(channel_multipliers)-1)); change tokenizer resolution or channel_multipliers")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_multipliers) - 1)

    @property
    def side(self) -> int:
        return self.resolution // self.downsample_factor


# Tokenizer sizes for `effigen train --network_preset=...` (method `rvq`): ours, for built-in data at 32 px
# (MSVQ-S/4's encoder: 4x downsampling to an 8x8 grid).
RVQ_PRESETS: dict[str, dict] = {
    "RVQ-S/4-d4": {"base_channels": 32, "channel_multipliers": [1, 2, 2], "num_res_blocks": 1, "latent_channels": 16,
                   "vocab_size": 256, "depth": 4},
    "RVQ-S/4-d8": {"base_channels": 32, "channel_multipliers": [1, 2, 2], "num_res_blocks": 1, "latent_channels": 16,
                   "vocab_size": 256, "depth": 8},
    "RVQ-Test": {"base_channels": 8, "channel_multipliers": [1, 2], "num_res_blocks": 1, "latent_channels": 4,
                 "vocab_size": 16, "depth": 3, "attention": False, "mid_attention": False},
}


class ResidualQuantizer(nn.Module):
    """Greedy residual quantization of every position over `depth` codebooks (key prefix `quantize`)."""

    def __init__(self, config: ResidualVQConfig):
        super().__init__()
        self.config = config
        books = 1 if config.shared_codebook else config.depth
        self.codebooks = nn.Parameter(torch.randn(books, config.vocab_size, config.latent_channels))
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(config.depth, config.vocab_size))
        self.restart_pool: list[torch.Tensor] | None = None  # residual vectors of the last training batch, per depth

    @property
    def depth(self) -> int:
        return self.config.depth

    def check_depth(self, depth: int | None) -> int:
        """`depth` (None: the trained one) if this tokenizer can produce it, else a ValueError naming the fix."""
        if depth is None:
            return self.depth
        if not isinstance(depth, int) or not 1 <= depth <= self.depth:
            raise ValueError(f"this residual VQ tokenizer was trained for depth {self.depth} (codes per position); "
                             f"depth {depth} is not available: use a depth in 1..{self.depth}, or train a tokenizer of "
                             f"that depth (effigen train --preset mnist-rvq --network.depth={depth})")
        return depth

    def codebook(self, j: int) -> torch.Tensor:
        """Depth j's codebook (V, C)."""
        return self.codebooks[0 if self.config.shared_codebook else j]

    def nearest(self, z: torch.Tensor, j: int) -> torch.Tensor:
        """Indices (N,) of depth j's nearest codes to z (N, C) (squared L2)."""
        codebook = self.codebook(j).detach().float()
        z = z.float()
        distance = z.square().sum(1, keepdim=True) + codebook.square().sum(1) - 2 * z @ codebook.T
        return distance.argmin(dim=1)

    def embed(self, indices: torch.Tensor, first_depth: int = 0) -> torch.Tensor:
        """Indices (..., d) of depths first_depth..first_depth+d-1 -> code vectors (..., d, C)."""
        d = indices.shape[-1]
        if first_depth + d > self.depth:
            self.check_depth(first_depth + d)
        if self.config.shared_codebook:
            return F.embedding(indices, self.codebooks[0])
        out = [F.embedding(indices[..., j], self.codebooks[first_depth + j]) for j in range(d)]
        return torch.stack(out, dim=-2)

    # ------------------------------------------------------------------ quantization
    def quantize(self, f: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        """f (B, C, h, w) -> indices (B, h*w, depth) (positions in raster order, depths coarse to fine)."""
        depth = self.check_depth(depth)
        B, C, h, w = f.shape
        rest = f.detach().float().permute(0, 2, 3, 1).reshape(-1, C)
        out = []
        for j in range(depth):
            indices = self.nearest(rest, j)
            rest = rest - self.codebook(j).float()[indices]
            out.append(indices)
        return torch.stack(out, dim=1).view(B, h * w, depth)

    def requantize(self, z: torch.Tensor, start: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ResGen's re-quantisation: z (N, C), a predicted sum of the codes of depths start..D-1 (start (N,) long,
        per row) -> (indices (N, D), zero at depths < start; the quantized sum (N, C) of the depths >= start)."""
        N, C = z.shape
        rest = z.detach().float()
        indices = torch.zeros(N, self.depth, dtype=torch.long, device=z.device)
        total = torch.zeros_like(rest)
        for j in range(self.depth):
            active = start <= j
            if not active.any():
                continue
            chosen = self.nearest(rest, j)
            code = self.codebook(j).float()[chosen] * active.unsqueeze(1)
            indices[:, j] = torch.where(active, chosen, torch.zeros_like(chosen))
            rest, total = rest - code, total + code
        return indices, total

    def latent_from_indices(self, indices: torch.Tensor, side: int) -> torch.Tensor:
        """Indices (B, L, d) of the first d depths -> f_hat (B, C, side, side), the sum of their codes."""
        B, L, _ = indices.shape
        if L != side * side:
            raise ValueError(f"{L} positions do not make a {side}x{side} grid")
        f_hat = self.embed(indices).float().sum(-2)  # (B, L, C)
        return f_hat.transpose(1, 2).reshape(B, self.config.latent_channels, side, side)

    # ------------------------------------------------------------------ training
    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: (straight-through f_hat, VQ loss, hits (D, V) of this batch, all processes)."""
        f = f.float()
        B, C, h, w = f.shape
        target = f.detach().permute(0, 2, 3, 1).reshape(-1, C)
        rest = target.clone()
        f_hat = torch.zeros_like(target)
        loss = f.new_zeros(())
        hits = f.new_zeros(self.depth, self.config.vocab_size)
        pool = []
        for j in range(self.depth):
            # up to 4 fixed positions per sample: independent of the batch split, so DDP gathers the one-process pool
            positions = torch.linspace(0, h * w - 1, min(4, h * w), device=f.device).long()
            pool.append(rest.view(B, h * w, C)[:, positions].reshape(-1, C))
            indices = self.nearest(rest, j)
            hits[j] = indices.bincount(minlength=self.config.vocab_size).float()
            code = self.codebook(j)[indices].float()
            f_hat = f_hat + code
            rest = rest - code.detach()
            partial = f_hat.view(B, h, w, C).permute(0, 3, 1, 2)
            loss = loss + F.mse_loss(partial.detach(), f) * self.config.beta + F.mse_loss(partial, f.detach())
        loss = loss / self.depth
        if self.training:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(hits)
            with torch.no_grad():
                ema = self.ema_vocab_hit_SV
                if ema.sum() == 0:
                    ema.copy_(hits)
                else:
                    ema.mul_(self.config.usage_decay).add_(hits, alpha=1 - self.config.usage_decay)
            self.restart_pool = [p.detach() for p in pool]
        f_hat = f_hat.view(B, h, w, C).permute(0, 3, 1, 2)
        return (f_hat.detach() - f.detach()) + f, loss, hits

    def usage(self) -> list[float]:
        """Per-depth % of codes whose hit EMA exceeds 8% of a uniform share (VAR's margin)."""
        out = []
        for j in range(self.depth):
            total = float(self.ema_vocab_hit_SV[j].sum())
            margin = total / self.config.vocab_size * 0.08
            out.append(100.0 * float((self.ema_vocab_hit_SV[j] > margin).float().mean()) if total > 0 else 0.0)
        return out

    @torch.no_grad()
    def restart_dead_codes(self, threshold: float, generator: torch.Generator) -> int:
        """Move codes whose hit EMA is below `threshold` (per depth; summed over depths for a shared codebook) onto
        random residual vectors of their depth from the last training batch (gathered over processes). Returns how many."""
        if self.restart_pool is None:
            return 0
        pools = self.restart_pool
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered_pools = []
            for pool in pools:
                gathered = [torch.empty_like(pool) for _ in range(torch.distributed.get_world_size())]
                torch.distributed.all_gather(gathered, pool)
                gathered_pools.append(torch.cat(gathered))
            pools = gathered_pools
        groups = ([(0, self.ema_vocab_hit_SV.sum(0), torch.cat(pools))] if self.config.shared_codebook else
                  [(j, self.ema_vocab_hit_SV[j], pools[j]) for j in range(self.depth)])
        restarted = 0
        for book, usage, pool in groups:
            dead = (usage < threshold).nonzero().flatten()
            if dead.numel() == 0:
                continue
            choice = torch.randint(pool.shape[0], (dead.numel(),), generator=generator).to(pool.device)
            self.codebooks[book, dead] = pool[choice].to(self.codebooks.dtype)
            rows = slice(None) if self.config.shared_codebook else slice(book, book + 1)
            self.ema_vocab_hit_SV[rows, dead] = self.ema_vocab_hit_SV[rows].mean(dim=1, keepdim=True)
            restarted += int(dead.numel())
        return restarted


class ResidualVQ(TokenizerOutput, nn.Module):
    """Encoder -> quant_conv -> residual quantizer -> post_quant_conv -> decoder.

    Tokenizer contract: `encode(images) -> f_hat` (the quantized latent), `decode(f_hat) -> images` in [-1, 1];
    tokens with `indices_from_images(images) -> (B, L, D)` and `latent_from_indices`."""

    config_class = ResidualVQConfig

    @classmethod
    def output_of(cls, config: ResidualVQConfig) -> TokenSpace:
        return TokenSpace(config.vocab_size, "residual", config.resolution, scales=(config.side,), depth=config.depth,
                          embed_dim=config.latent_channels, image_channels=config.in_channels)

    def __init__(self, config: ResidualVQConfig):
        super().__init__()
        self.config = config
        attach_vq_autoencoder(self, config, ResidualQuantizer)

    @property
    def scales(self) -> tuple[int, ...]:
        return (self.config.side,)

    @property
    def depth(self) -> int:
        return self.config.depth

    def features(self, images: torch.Tensor) -> torch.Tensor:
        c, r = self.config.in_channels, self.config.resolution
        if images.ndim != 4 or images.shape[1] != c or tuple(images.shape[-2:]) != (r, r):
            raise ValueError(f"expected images (B, {c}, {r}, {r}) in [-1, 1], got {tuple(images.shape)}")
        return self.quant_conv(self.encoder(images))

    @torch.no_grad()
    def indices_from_images(self, images: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        """Token indices (B, L, depth) int64, positions in raster order, depths coarse to fine."""
        return self.quantize.quantize(self.features(images), depth)

    def latent_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.quantize.latent_from_indices(indices, self.config.side)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.latent_from_indices(self.indices_from_images(images))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """f_hat (B, C, h, w) -> images (B, 3, H, W) clamped to [-1, 1]."""
        return self.decoder(self.post_quant_conv(latents.float())).clamp(-1, 1)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(images))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: (reconstruction (unclamped), VQ loss, per-depth hits of the batch)."""
        f_hat, vq_loss, hits = self.quantize(self.features(images))
        return self.decoder(self.post_quant_conv(f_hat)), vq_loss, hits
