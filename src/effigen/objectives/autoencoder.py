"""What the image autoencoders' training losses share (VQ tokenizers: `objectives.vq_tokenizer`; the KL-VAE:
`objectives.kl_vae`): a pixel reconstruction term, an optional perceptual distance on a frozen feature net and an
optional PatchGAN term with VQGAN's adaptive weight:

    rec = l2_weight * ||x_rec - x||^2 + l1_weight * |x_rec - x| + perceptual_weight * P(x_rec, x)
    loss = rec + <the autoencoder's own terms> + adaptive_weight * gan_weight * (-D(x_rec))   (after gan_start_step)

- Perceptual term P: an LPIPS-like distance (unit-normalised channels, squared difference, spatial mean, summed
  over layers) on the intermediate stages of a frozen feature net that exists offline: a built-in one
  (`mnist-net`, `digits-net`, `shapes-net`) or a user's `.safetensors` file saved by
  `effigen.eval.feature_nets.save_feature_net`. Only the stages before the last are used, so the final features
  that FID (mnist-net) measures are not optimised directly (the coupling is weaker, not zero: say which net
  trained the autoencoder when you report FIDs on the same net). LPIPS itself needs VGG weights that cannot be
  downloaded here.
- GAN: a PatchGAN discriminator (taming's NLayerDiscriminator with GroupNorm, so a sample's output never depends
  on its batch) trained with the hinge loss; the generator term is weighted adaptively as in VQGAN,
  ||grad_last L_rec|| / ||grad_last L_gan|| at the decoder's last layer, clamped to [0, 1e4]. The
  discriminator is an auxiliary trainable module of the objective (`trainable_modules`): the trainer optimises
  and checkpoints it with the autoencoder, and the two losses reach only their own parameters.
- Further auxiliary modules of a subclass (VA-VAE's `linear_proj`, `objectives.kl_vae`) join the discriminator in
  one `AuxiliaryModules` container (`add_auxiliary`), the one module the trainer optimises, wraps in DDP and
  checkpoints (keys `discriminator.*`, `linear_proj.*`); without them the discriminator alone is that module, with
  its own key names, as before. `adaptive_weight` serves any term balanced against the reconstruction at some
  layer (VA-VAE's VF loss at the encoder's last layer, clamped to [0, 1e8] as its code does).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .next_scale import unwrap


@dataclass
class NoSamplerConfig:
    """Tokenizers have no sampler settings."""


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al.; taming's NLayerDiscriminator) with GroupNorm instead of BatchNorm."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 2):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            blocks += [nn.Conv2d(width, out, 4, stride, 1, bias=False), nn.GroupNorm(min(32, out // 4), out), nn.LeakyReLU(0.2)]
            width = out
        blocks.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.main = nn.Sequential(*blocks)
        self.layers = layers
        self.minimum_size = 3 * 2**layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = min(x.shape[-2:])
        if side < self.minimum_size:
            fits = max((n for n in range(1, self.layers + 1) if 3 * 2**n <= side), default=0)
            raise ValueError(f"images of {side} px are too small for a PatchGAN with discriminator_layers={self.layers} "
                             f"(needs >= {self.minimum_size} px); set objective.discriminator_layers={fits}"
                             + (" " if fits else " (none fits: use a larger data.resolution or gan_weight=0)"))
        return self.main(x)


class PerceptualDistance(nn.Module):
    """LPIPS-like distance on the stages of a frozen effigen feature net (no learned layer weights)."""

    def __init__(self, name_or_path: str):
        super().__init__()
        from ..eval.feature_nets import FEATURE_NETS, load_feature_net, load_feature_net_file

        if name_or_path in FEATURE_NETS:
            net = load_feature_net(name_or_path)
        elif Path(name_or_path).is_file():
            net = load_feature_net_file(name_or_path)
        else:
            raise FileNotFoundError(f"perceptual_net {name_or_path!r} is neither a built-in feature net "
                                    f"({', '.join(FEATURE_NETS)}) nor a feature-net .safetensors file")
        self.net = net.float().eval().requires_grad_(False)
        self.native = net.config.native_resolution
        # stage boundaries: outputs after each AvgPool except the last one
        pools = [i for i, layer in enumerate(net.body) if isinstance(layer, nn.AvgPool2d)]
        self.taps = set(pools[:-1]) if len(pools) > 1 else set(pools)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        x = torch.cat((a, b)).float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if tuple(x.shape[-2:]) != (self.native, self.native):
            x = F.interpolate(x, size=(self.native, self.native), mode="bilinear", align_corners=False, antialias=True)
        total = x.new_zeros(())
        for i, layer in enumerate(self.net.body):
            x = layer(x)
            if i in self.taps:
                fa, fb = F.normalize(x, dim=1).chunk(2)
                total = total + (fa - fb).square().sum(1).mean()
            if i >= max(self.taps):
                break
        return total


class AuxiliaryModules(nn.ModuleDict):
    """Several auxiliary trainable modules as the one module the trainer optimises, wraps in DDP and checkpoints.
    Calls go through `forward(name, *args)` (so through the DDP wrapper): `aux("discriminator", images)`."""

    def forward(self, name: str, *args, **kwargs):
        return self[name](*args, **kwargs)


class AutoencoderLoss:
    """Base of the autoencoder losses: reconstruction + perceptual + GAN terms (see the module docstring).
    Subclasses add their own terms (VQ loss, KL) in `loss`; their config carries the fields read here."""

    sampler_config_class = NoSamplerConfig

    def __init__(self, config, num_classes: int = 0):
        self.config = config
        self.perceptual = PerceptualDistance(config.perceptual_net) if config.perceptual_weight > 0 else None
        self.discriminator = (PatchDiscriminator(3, config.discriminator_channels, config.discriminator_layers)
                              if config.gan_weight > 0 else None)
        self.discriminator_model: nn.Module | None = self.discriminator  # the trainer may wrap it (DDP)
        # the discriminator and a subclass's own trainable modules together (None: the discriminator alone)
        self.auxiliary: AuxiliaryModules | None = None
        self.auxiliary_model: nn.Module | None = None  # the trainer may wrap it (DDP)

    # ---------------------------------------------------------------- trainer hooks
    def trainable_modules(self) -> nn.Module | None:
        return self.discriminator if self.auxiliary is None else self.auxiliary

    def bind_trainable(self, wrapped: nn.Module) -> None:
        if self.auxiliary is None:
            self.discriminator_model = wrapped
        else:
            self.auxiliary_model = wrapped

    def add_auxiliary(self, name: str, module: nn.Module) -> None:
        """Train `module` with the autoencoder, next to the discriminator (before the trainer is built)."""
        parts = dict(self.auxiliary.items()) if self.auxiliary is not None else (
            {"discriminator": self.discriminator} if self.discriminator is not None else {})
        parts[name] = module
        self.auxiliary = self.auxiliary_model = AuxiliaryModules(parts)

    def auxiliary_call(self, name: str, *args) -> torch.Tensor:
        """Run an auxiliary module through the trainer's wrapper (DDP synchronises its gradients)."""
        if self.auxiliary is None:
            return self.discriminator_model(*args)
        return self.auxiliary_model(name, *args)

    # ---------------------------------------------------------------- terms
    def reconstruction_terms(self, images: torch.Tensor, reconstruction: torch.Tensor,
                             logs: dict[str, torch.Tensor]) -> torch.Tensor:
        config = self.config
        l2 = (reconstruction - images).square().mean()
        l1 = (reconstruction - images).abs().mean()
        rec_loss = config.l2_weight * l2 + config.l1_weight * l1
        logs.update(l2=l2.detach(), l1=l1.detach())
        if self.perceptual is not None:
            self.perceptual.to(images.device)
            perceptual = self.perceptual(reconstruction, images)
            rec_loss = rec_loss + config.perceptual_weight * perceptual
            logs["perceptual"] = perceptual.detach()
        return rec_loss

    def adversarial_terms(self, model: nn.Module, images: torch.Tensor, reconstruction: torch.Tensor,
                          rec_loss: torch.Tensor, step: int, logs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The generator's adaptively weighted GAN term + the discriminator's hinge loss (0 before gan_start_step)."""
        config = self.config
        if self.discriminator is None or step < config.gan_start_step:
            if self.discriminator is not None and self.auxiliary is not None:
                # the discriminator shares its DDP wrapper with modules used at this step, and DDP wants a gradient
                # for every parameter: zeros (on one process too, so that a run does not depend on the process count)
                return sum(p.sum() for p in self.discriminator.parameters()) * 0.0
            return rec_loss.new_zeros(())
        disc = self.discriminator
        frozen = {k: v.detach() for k, v in disc.named_parameters()}
        fake_logits = torch.func.functional_call(disc, frozen, (reconstruction,))
        gan_g = -fake_logits.float().mean()
        weight = self.adaptive_weight(rec_loss, gan_g, unwrap(model).decoder.last_layer)
        real_d = self.auxiliary_call("discriminator", images.detach())
        fake_d = self.auxiliary_call("discriminator", reconstruction.detach())
        gan_d = 0.5 * (F.relu(1 - real_d.float()).mean() + F.relu(1 + fake_d.float()).mean())
        logs.update(gan_g=gan_g.detach(), gan_d=gan_d.detach(), gan_weight=weight.detach())
        return weight * config.gan_weight * gan_g + gan_d

    @staticmethod
    def adaptive_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor,
                        max_weight: float = 1e4) -> torch.Tensor:
        """||grad_last rec_loss|| / (||grad_last gan_loss|| + 1e-4), clamped to [0, max_weight], no gradient
        (VQGAN's d_weight; VA-VAE's vf_weight with `max_weight` 1e8 and another loss in place of the GAN's)."""
        rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
        gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # the gradients of the global batch (mean losses: the average over processes), so that the weight, and
            # with it the run, does not depend on how the batch is split
            grads = torch.stack((rec_grad, gan_grad))
            torch.distributed.all_reduce(grads, op=torch.distributed.ReduceOp.AVG)
            rec_grad, gan_grad = grads[0], grads[1]
        return (rec_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()
