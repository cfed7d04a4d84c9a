"""Training objective of the KL autoencoder (`tokenizers.kl_vae.KLVAE`), as LDM trains the SD-VAE and
LightningDiT the VA-VAE (their `LPIPSWithDiscriminator` / `contperceptual.py` losses):

    loss = l1_weight * |x_rec - x| + l2_weight * ||x_rec - x||^2 + perceptual_weight * P(x_rec, x)
         + kl_weight * KL(q(z|x) || N(0, I)) + adaptive_weight * gan_weight * (-D(x_rec))   (after gan_start_step)

x_rec decodes a sample z = mean + std * noise of the posterior (the noise from the trainer's per-sample stream, so
runs resume exactly and do not depend on how the batch is split). The KL is summed over latent dimensions and
averaged over the batch, the pixel terms are per-pixel means, as in LDM (whose default kl_weight 1e-6 is kept; LDM
also learns a log-variance of the reconstruction error, which at its initial value 0 is the plain L1 used here).
The perceptual and GAN terms are `objectives.autoencoder`'s (shared with the VQ tokenizers): LPIPS needs VGG
weights that cannot be downloaded here, so the perceptual distance runs on a built-in feature net.

VA-VAE (Yao et al., arXiv 2501.01423, "Reconstruction vs. Generation"; LightningDiT's `vavae/ldm/models/
autoencoder.py` and `vavae/ldm/modules/losses/contperceptual.py`) adds the vision-foundation alignment (VF loss),
switched on by vf_weight > 0. The sampled latent z (the one the decoder sees, as the official code aligns) is
projected to the teacher's width by a 1x1 convolution without bias (`reverse_proj`: z' = W z, `linear_proj`), and
compared with the frozen teacher's patch features f of the input images at the latent grid
(`teacher.features(images, grid=latent side)`, no gradient), with z'_ij, f_ij the tokens of image b at position i:

    L_mcos  = mean_{b,i} ReLU(1 - m1 - cos(z'_bi, f_bi))                                       m1 = cos_margin 0.5
    L_mdms  = mean_{b,i,j} ReLU(|cos(z'_bi, z'_bj) - cos(f_bi, f_bj)| - m2)                   m2 = distmat_margin 0.25
    L_vf    = distmat_weight * L_mdms + cos_weight * L_mcos                                    (weights 1.0 each)
    loss   += vf_weight * w_adaptive * L_vf,   w_adaptive = ||grad_E L_rec|| / (||grad_E L_vf|| + 1e-4)

with E the encoder's last layer (`encoder.conv_out.weight`), L_rec the reconstruction terms (pixels + perceptual,
LDM's nll without the KL), w_adaptive clamped to [0, 1e8] and detached as the official `calculate_adaptive_weight_vf`
does (`objectives.autoencoder.AutoencoderLoss.adaptive_weight`); adaptive_vf=false uses vf_weight alone. The
projection trains with the autoencoder as an auxiliary module next to the discriminator (`linear_proj.weight` in
train_state/auxiliary.safetensors; not part of the tokenizer folder). The mean-reduced pixel terms here (LDM sums
over pixels) leave the VF term's share unchanged: the adaptive weight makes its gradient at E vf_weight times the
reconstruction's whatever their scales. Differences from the official code: the teacher applies its own
normalisation (the official code feeds DINOv2 the [-1, 1] images without ImageNet normalisation) and is any effigen
teacher (`vf_teacher`: a built-in such as mnist-vit, or dinov2-...=PATH) at the latent grid (the official code
resizes to 224 px and reads DINOv2-L/14's 16 x 16 tokens, equal to the f16 latent grid at 256 px); the official
schedule of weights and margins over epochs (f16d32_vfdinov2_long.yaml) is one constant setting here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, check_range
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
    # VA-VAE's vision-foundation alignment (module docstring); vf_weight 0 = off (the plain KL-VAE)
    vf_weight: float = 0.0  # VA-VAE: 0.1
    vf_teacher: str = ""  # a teacher spec for effigen.teachers.load_teacher: "mnist-vit", "dinov2-vitl14=PATH", ...
    cos_margin: float = 0.5  # m1 of the marginal cosine term
    distmat_margin: float = 0.25  # m2 of the marginal distance-matrix term
    cos_weight: float = 1.0
    distmat_weight: float = 1.0
    adaptive_vf: bool = True  # scale by ||grad_E L_rec|| / ||grad_E L_vf|| at the encoder's last layer

    def __post_init__(self):  # a ValueError naming the setting (config_from_dict: a ConfigError)
        check_range("vf_weight", self.vf_weight, 0, meaning="0 switches VA-VAE's VF alignment off")
        check_range("cos_margin", self.cos_margin, 0, 2, high_open=True,
                    meaning="the term is ReLU(1 - cos_margin - cos), zero everywhere from 2 on")
        check_range("distmat_margin", self.distmat_margin, 0, 2, high_open=True,
                    meaning="the term is ReLU(|S_z - S_f| - distmat_margin) with |S_z - S_f| <= 2")
        check_range("cos_weight", self.cos_weight, 0)
        check_range("distmat_weight", self.distmat_weight, 0)
        if self.vf_weight > 0:
            if not self.vf_teacher.strip():
                raise ValueError("vf_weight > 0 aligns the latents to a frozen teacher: set vf_teacher to a built-in "
                                 "one (mnist-vit, mnist-net) or a local DINOv2 checkpoint (dinov2-vitl14=PATH), or "
                                 "vf_weight=0 to train without the alignment")
            if self.cos_weight == 0 and self.distmat_weight == 0:
                raise ValueError("vf_weight > 0 with cos_weight = distmat_weight = 0 aligns nothing; give one of "
                                 "them a positive weight, or set vf_weight=0")


def vf_loss_terms(projected: torch.Tensor, features: torch.Tensor, cos_margin: float = 0.5,
                  distmat_margin: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    """VA-VAE's marginal cosine and marginal distance-matrix terms of projected latent tokens z' and teacher
    tokens f, both (B, N, C): (mean ReLU(1 - m1 - cos(z'_i, f_i)), mean ReLU(|S_z' - S_f| - m2)) with S the
    per-image N x N token-token cosine similarity matrices."""
    if projected.shape != features.shape:
        raise ValueError(f"projected latents {tuple(projected.shape)} and teacher features {tuple(features.shape)} "
                         "differ in shape")
    cos = F.cosine_similarity(features, projected, dim=-1)  # (B, N)
    cos_term = F.relu(1 - cos_margin - cos).mean()
    z_norm, f_norm = F.normalize(projected, dim=-1), F.normalize(features, dim=-1)
    z_sim = z_norm @ z_norm.transpose(1, 2)  # (B, N, N)
    f_sim = f_norm @ f_norm.transpose(1, 2)
    distmat_term = F.relu((z_sim - f_sim).abs() - distmat_margin).mean()
    return cos_term, distmat_term


class KLVAELoss(AutoencoderLoss):
    config_class = KLVAELossConfig

    def __init__(self, config: KLVAELossConfig, num_classes: int = 0, teacher=None):
        """`teacher`: a `teachers.Teacher` to align to; without one, `prepare_network` loads
        `load_teacher(config.vf_teacher)` when vf_weight > 0 (not here: a Pipeline builds this objective to load a
        trained tokenizer, which must not need the teacher's weights). `prepare_network(network)` also builds the VF
        projection, which needs the latent width."""
        super().__init__(config, num_classes)
        self.teacher = teacher.frozen() if teacher is not None and config.vf_weight > 0 else None
        self.linear_proj: nn.Conv2d | None = None

    @property
    def vf_enabled(self) -> bool:
        return self.config.vf_weight > 0

    def prepare_network(self, network: nn.Module) -> None:
        """Build VA-VAE's projection (latent channels -> teacher width) and check that the teacher serves the
        latent grid; called before the trainer collects the trainable modules. Nothing to do without VF."""
        if not self.vf_enabled or self.linear_proj is not None:
            return
        from ..teachers import TeacherError  # imported here: only VA-VAE needs a teacher

        if self.teacher is None:
            from ..teachers import load_teacher

            try:
                self.teacher = load_teacher(self.config.vf_teacher).frozen()
            except TeacherError as e:
                raise ConfigError(f"objective.vf_teacher={self.config.vf_teacher!r}: {e}") from None
        config = network.config
        side = config.resolution // config.downsample_factor
        try:
            self.teacher.grid_for(side)
        except TeacherError as e:
            raise ConfigError(f"objective.vf_teacher={self.config.vf_teacher!r} cannot serve the {side}x{side} "
                              f"latent grid: {e}") from None
        # LightningDiT: torch.nn.Conv2d(embed_dim, vf_feature_dim, kernel_size=1, bias=False) when reverse_proj
        self.linear_proj = nn.Conv2d(config.latent_channels, self.teacher.embed_dim, 1, bias=False)
        self.add_auxiliary("linear_proj", self.linear_proj)

    def vf_terms(self, model: nn.Module, images: torch.Tensor, z: torch.Tensor, rec_loss: torch.Tensor,
                 logs: dict[str, torch.Tensor]) -> torch.Tensor:
        """vf_weight * w_adaptive * (distmat_weight * L_mdms + cos_weight * L_mcos) of the sampled latent z."""
        if self.linear_proj is None:
            raise RuntimeError("KLVAELoss with vf_weight > 0 needs prepare_network(network) before training (it "
                               "builds the latent-to-teacher projection)")
        config = self.config
        side = z.shape[-1]
        self.teacher.to(z.device)
        with torch.autocast(z.device.type, enabled=False):
            features = self.teacher.features(images.float(), grid=side).float()  # (B, side^2, C), no grad
            projected = self.auxiliary_call("linear_proj", z.float())  # (B, C, side, side)
            projected = projected.flatten(2).transpose(1, 2)  # (B, side^2, C), row-major like the teacher's tokens
            cos_term, distmat_term = vf_loss_terms(projected, features, config.cos_margin, config.distmat_margin)
            vf = config.distmat_weight * distmat_term + config.cos_weight * cos_term
        if config.adaptive_vf:
            adaptive = self.adaptive_weight(rec_loss, vf, unwrap(model).encoder.conv_out.weight, max_weight=1e8)
            weight = config.vf_weight * adaptive
            logs["vf_adaptive"] = adaptive
        else:
            weight = vf.new_tensor(config.vf_weight)
        logs.update(vf_loss=vf.detach(), vf_cos=cos_term.detach(), vf_distmat=distmat_term.detach(),
                    vf_weight=weight.detach())
        return weight * vf

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], random: BatchRandom) -> dict[str, torch.Tensor]:
        images = batch["images"]
        noise = random.randn(*unwrap(model).latent_shape(images.shape[-1]))
        reconstruction, mean, logvar = model(images, noise)
        if self.vf_enabled:  # the sample the decoder saw (KLVAE.forward), which VA-VAE aligns
            z = mean + torch.exp(0.5 * logvar) * noise.to(mean.dtype)
        reconstruction = reconstruction.float()
        logs: dict[str, torch.Tensor] = {}
        rec_loss = self.reconstruction_terms(images, reconstruction, logs)
        mean, logvar = mean.float(), logvar.float()
        kl = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()
        loss = rec_loss + self.config.kl_weight * kl
        loss = loss + self.adversarial_terms(model, images, reconstruction, rec_loss, random.key[1], logs)
        if self.vf_enabled:
            loss = loss + self.vf_terms(model, images, z, rec_loss, logs)
        logs.update(kl=kl.detach(), loss=loss)
        return logs
