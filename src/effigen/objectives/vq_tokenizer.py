"""Training objective of VQ tokenizers (VAR's multi-scale VQ-VAE; the raster baseline's single-scale VQ):

    loss = l2_weight * ||x_rec - x||^2 + l1_weight * |x_rec - x| + vq_weight * VQ loss
         + perceptual_weight * P(x_rec, x) + adaptive_weight * gan_weight * (-D(x_rec))     (after gan_start_step)

- VQ loss: the quantizer's per-scale commitment + codebook terms (`MultiScaleQuantizer.forward`).
- Reconstruction, perceptual and GAN terms: `objectives.autoencoder` (shared with the KL-VAE).
- Dead codes: after each optimizer step divisible by `restart_every`, codes whose usage EMA summed over scales is
  below `restart_threshold` are moved onto residual vectors of the last batch (`after_step`), with a generator
  seeded by (seed, step), so runs and resumes stay deterministic. Per-scale codebook usage is logged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..rng import BatchRandom
from .autoencoder import AutoencoderLoss, NoSamplerConfig, PatchDiscriminator, PerceptualDistance  # noqa: F401
from .next_scale import unwrap

# Tokenizer sizes for `effigen train --network_preset=...` (method `msvq`).
MSVQ_PRESETS: dict[str, dict] = {
    # VAR's released tokenizer (vae_ch160v4096z32.pth): 256 px, 16x downsampling, 10 scales
    "VAR-VQVAE": {"base_channels": 160, "channel_multipliers": [1, 1, 2, 2, 4], "latent_channels": 32, "vocab_size": 4096},
    # built-in data at 32 px: 4x downsampling to 8x8, 7 scales (155 tokens)
    "MSVQ-S/4": {"base_channels": 32, "channel_multipliers": [1, 2, 2], "num_res_blocks": 1, "latent_channels": 16,
                 "vocab_size": 512, "scales": [1, 2, 3, 4, 5, 6, 8], "share_quant_resi": 4},
    # the raster-AR baseline's tokenizer: MSVQ-S/4's encoder and codebook with a single 8x8 scale (a plain VQ-VAE, 64 tokens)
    "VQ-S/4": {"base_channels": 32, "channel_multipliers": [1, 2, 2], "num_res_blocks": 1, "latent_channels": 16,
               "vocab_size": 512, "scales": [8], "share_quant_resi": 1},
    "MSVQ-Test": {"base_channels": 8, "channel_multipliers": [1, 2], "num_res_blocks": 1, "latent_channels": 4,
                  "vocab_size": 32, "scales": [1, 2, 4], "share_quant_resi": 2},
}


@dataclass
class VQTokenizerLossConfig:
    l2_weight: float = 1.0
    l1_weight: float = 0.0
    vq_weight: float = 1.0
    perceptual_weight: float = 0.0
    perceptual_net: str = ""  # "mnist-net" / "digits-net" / "shapes-net" or a path to a feature-net .safetensors
    gan_weight: float = 0.0
    gan_start_step: int = 0
    discriminator_channels: int = 64
    discriminator_layers: int = 2
    restart_every: int = 25  # 0 disables dead-code restarts
    restart_threshold: float = 0.03  # usage EMA (hits per batch, summed over scales) below which a code is dead


class VQTokenizerLoss(AutoencoderLoss):
    config_class = VQTokenizerLossConfig

    def __init__(self, config: VQTokenizerLossConfig, num_classes: int = 0):
        super().__init__(config, num_classes)
        self.restarted = 0

    @torch.no_grad()
    def after_step(self, network: nn.Module, step: int, seed: int) -> dict[str, float]:
        """Called by the trainer after the optimizer step `step` (1-based count of steps done)."""
        quantizer = unwrap(network).quantize
        if self.config.restart_every and step % self.config.restart_every == 0:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
            self.restarted += quantizer.restart_dead_codes(self.config.restart_threshold, generator)
        return {"restarted_codes": float(self.restarted)}  # this run's total

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], random: BatchRandom) -> dict[str, torch.Tensor]:
        images = batch["images"]
        reconstruction, vq_loss, hits = model(images)
        reconstruction = reconstruction.float()
        logs: dict[str, torch.Tensor] = {"vq": vq_loss.detach()}
        rec_loss = self.reconstruction_terms(images, reconstruction, logs)
        loss = rec_loss + self.config.vq_weight * vq_loss
        loss = loss + self.adversarial_terms(model, images, reconstruction, rec_loss, random.key[1], logs)
        # per-scale usage of this batch (% of the codebook hit), for the logs
        for si in range(hits.shape[0]):
            logs[f"usage_scale{si}"] = (hits[si] > 0).float().mean() * 100
        logs["loss"] = loss
        return logs
