"""Training objective of the KL autoencoder (`tokenizers.kl_vae.KLVAE`), as LDM trains the SD-VAE and
LightningDiT the VA-VAE (their `LPIPSWithDiscriminator` / `contperceptual.py` losses):

    loss = l1_weight * |x_rec - x| + l2_weight * ||x_rec - x||^2 + perceptual_weight * P(x_rec, x)
         + kl_weight * KL(q(z|x) || N(0, I)) + adaptive_weight * gan_weight * (-D(x_rec))   (after gan_start_step)

x_rec decodes a sample z = mean + std * noise of the posterior (the noise from the trainer's per-sample stream, so
runs resume exactly and do not depend on how the batch is split). The KL is summed over latent dimensions and
averaged over the batch, the pixel terms are per-pixel means, as in LDM (whose default kl_weight 1e-6 is kept; LDM
also learns a log-variance of the reconstruction error, which at its initial value 0 is the plain L1 used here).
The perceptual and GAN terms are `objectives.autoencoder`'s (shared with the VQ tokenizers): LPIPS needs VGG
weights that cannot be downloaded here, so the perceptual distance runs on a built-in feature net. VA-VAE's
vision-foundation alignment (VF loss) is not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..rng import BatchRandom
from .autoencoder import AutoencoderLoss
from .next_scale import unwrap

# Autoencoder sizes for `effigen train --network_preset=...` (method `klvae`).
KLVAE_PRESETS: dict[str, dict] = {
    # Stable Diffusion's VAE (f8, 4 channels; 83.65M parameters), the latent space of DiT/SiT/DiCo/REPA
    "SD-VAE": {"base_channels": 128, "channel_multipliers": [1, 2, 4, 4], "num_res_blocks": 2, "latent_channels": 4,
               "resolution": 256},
    # LightningDiT's VA-VAE (f16, 32 channels, attention at 16 px); its latents are normalised per channel
    "VA-VAE": {"base_channels": 128, "channel_multipliers": [1, 1, 2, 2, 4], "num_res_blocks": 2, "latent_channels": 32,
               "attention_resolutions": [16], "resolution": 256, "scaling_factor": 1.0},
    # built-in data at 32 px: 4x downsampling to an 8x8x4 latent (MSVQ-S/4's encoder/decoder widths)
    "KL-S/4": {"base_channels": 32, "channel_multipliers": [1, 2, 2], "num_res_blocks": 1, "latent_channels": 4},
    "KL-Test": {"base_channels": 8, "channel_multipliers": [1, 2], "num_res_blocks": 1, "latent_channels": 4},
}


@dataclass
class KLVAELossConfig:
    l1_weight: float = 1.0
    l2_weight: float = 0.0
    kl_weight: float = 1e-6  # LDM's SD-VAE / VA-VAE setting
    perceptual_weight: float = 0.0
    perceptual_net: str = ""  # "mnist-net" / "digits-net" / "shapes-net" or a path to a feature-net .safetensors
    gan_weight: float = 0.0  # LDM/VA-VAE: 0.5
    gan_start_step: int = 0  # LDM: 50001, VA-VAE: 5001
    discriminator_channels: int = 64
    discriminator_layers: int = 2


class KLVAELoss(AutoencoderLoss):
    config_class = KLVAELossConfig

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], random: BatchRandom) -> dict[str, torch.Tensor]:
        images = batch["images"]
        noise = random.randn(*unwrap(model).latent_shape(images.shape[-1]))
        reconstruction, mean, logvar = model(images, noise)
        reconstruction = reconstruction.float()
        logs: dict[str, torch.Tensor] = {}
        rec_loss = self.reconstruction_terms(images, reconstruction, logs)
        mean, logvar = mean.float(), logvar.float()
        kl = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()
        loss = rec_loss + self.config.kl_weight * kl
        loss = loss + self.adversarial_terms(model, images, reconstruction, rec_loss, random.key[1], logs)
        logs.update(kl=kl.detach(), loss=loss)
        return logs
